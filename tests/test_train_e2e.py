"""The training script end to end on a minute budget: warm start, PGPO on DAPO with a KL term, micro-batches, logs,
evaluation."""

import json
import os

import numpy as np
import pytest

from jaxvg import train


@pytest.mark.slow
def test_train_script_runs_and_writes_its_logs(tmp_path, capsys):
  out = tmp_path / "run"
  result = train.main([
      "--config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"),
      "--set", f"train.out_dir={out}", "--set", "train.steps=2", "--set", "sft.steps=2",
      "--set", "sft.perception_steps=2", "--set", "sft.batch_size=2",
      "--set", "sft_optim.total_steps=2", "--set", "data.prompts_per_batch=2", "--set", "data.num_eval=2",
      "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=8", "--set", "algo.dynamic_sampling=false",
      "--set", "credit.method=pgpo", "--set", "algo.kl_coef=0.01", "--set", "model.tiny_width=32",
      "--set", "model.tiny_layers=1", "--set", "model.tiny_vision_width=32", "--set", "algo.micro_batches=2",
  ])
  printed = capsys.readouterr().out
  assert printed.count("accuracy before:") == 1 and "accuracy after:" in printed
  # Each jitted stage says when it compiles and how long that took (the first call at new shapes).
  for stage in ("warm-start step (sft)", "held-out evaluation", "sampler", "old-policy scoring", "credit (pgpo)",
                "policy update"):
    assert f"compiling {stage} ..." in printed and f"{stage} compiled and ran in" in printed, stage
  assert len(result["reward_curve"]) == 2
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  rl = [r for r in rows if r["step"] >= 0 and "reward/overall" in r]
  assert [r["step"] for r in rl] == [0, 1]
  for r in rl:
    # PGPO ran: dependency statistics were logged, and the KL term was computed against the frozen reference.
    assert "dependency/mean" in r and "kl_ref" in r and "time/sample" in r and "dynamic_sampling/tries" in r
    assert 0.0 <= r["time/data_wait"] <= r["time/step"]
    # Two drawn batches of 2 prompts, accumulated into the step's one update.
    assert r["dynamic_sampling/tries"] == 2 and r["dynamic_sampling/groups_seen"] == 4
    assert 0.0 <= r["reward/overall"] <= 1.0
  assert any(r["step"] < 0 and "sft/sft_loss" in r for r in rows)  # the warm start logs at negative steps
  samples = [json.loads(line) for line in open(out / "samples.jsonl")]
  assert samples and {"completion", "answer", "accuracy", "tokens", "token_k3", "pgpo_weight"} <= set(samples[0])
  for sample in samples:  # PGPO's dependency map rides with each sample: one k3 score and weight per token
    assert len(sample["tokens"]) == len(sample["token_k3"]) == len(sample["pgpo_weight"]) > 0
    assert all(0.0 <= d <= 10.0 for d in sample["token_k3"]) and all(w >= 0.0 for w in sample["pgpo_weight"])
    # Mass conservation (methods.md 2.2): the weights of a response sum to its length.
    assert abs(sum(sample["pgpo_weight"]) - len(sample["tokens"])) < 1e-2 * len(sample["tokens"])
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(out / "tensorboard"))
  events.Reload()
  assert "reward/overall" in events.Tags()["scalars"]
  assert os.path.isdir(out / "final") and os.path.isdir(out / "sft" / "params")


@pytest.mark.parametrize("assignment, message", [
    ("rollout.group_sz=2", "unknown key 'group_sz'"),
    ("train.save_every=0", "train.save_every=0: must be an integer >= 1"),
    ("algo.name=gpro", "algo.name='gpro': choose one of"),
])
def test_config_mistakes_are_one_line_before_any_work(tmp_path, capsys, assignment, message):
  out = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    train.main(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"),
                "--set", f"train.out_dir={out}", "--set", assignment])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("config error: ") and message in err[0]
  assert not out.exists()  # nothing was written


def test_a_split_without_a_usable_record_is_one_line_naming_the_file(tmp_path, capsys):
  data = tmp_path / "train.jsonl"
  data.write_text("".join(json.dumps({"id": f"r{i}", "image": f"missing{i}.png", "problem": "<image>How many?",
                                      "answer": "3"}) + "\n" for i in range(2)))
  with pytest.raises(SystemExit) as e:
    train.main(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"),
                "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "data.source=jsonl", "--set", f"data.path={data}",
                "--set", "sft.steps=0", "--set", "sft.perception_steps=0", "--set", "model.tiny_width=32",
                "--set", "model.tiny_layers=1", "--set", "model.tiny_vision_width=32"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0] == (f"data error: {data}: the dataset yielded no usable record; counts: "
                                      "{'ok': 0, 'missing_image_file': 2}"), err


def test_runaway_updates_stop_the_run_without_saving_them(tmp_path, capsys):
  # lr = 1e30: every update would move the weights by far more than their own norm (a random tiny policy earns no
  # reward, so weight decay makes the update), so the guard skips each one; after train.max_skipped_updates = 2 in
  # a row the run stops with exit code 3 and never writes `final`.
  out = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    train.main(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"),
                "--set", f"train.out_dir={out}", "--set", "optim.lr=1e30", "--set", "optim.weight_decay=0.01",
                "--set", "train.max_skipped_updates=2",
                "--set", "train.steps=4", "--set", "sft.steps=0", "--set", "sft.perception_steps=0",
                "--set", "train.eval_white_image=false", "--set", "data.num_eval=2",
                "--set", "data.prompts_per_batch=2", "--set", "rollout.group_size=2",
                "--set", "rollout.max_new_tokens=8", "--set", "algo.dynamic_sampling=false",
                "--set", "model.tiny_width=32", "--set", "model.tiny_layers=1", "--set", "model.tiny_vision_width=32"])
  assert e.value.code == 3
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  rl = [r for r in rows if r["step"] >= 0 and "update_skipped" in r]
  assert [(r["step"], r["update_skipped"], r["update_skip_reason"]) for r in rl] == [(0, 1.0, 3.0), (1, 1.0, 3.0)]
  logged = capsys.readouterr().out  # the run's log goes to stdout
  assert "step 0: update skipped (update norm above optim.max_update_ratio" in logged
  assert "2 updates in a row were skipped" in logged
  assert not (out / "final").exists()


TINY = ["--set", "train.steps=2", "--set", "sft.steps=2",
        "--set", "sft.perception_steps=2", "--set", "sft.batch_size=2", "--set", "sft_optim.total_steps=2",
        "--set", "distill.teacher_sft_steps=2", "--set", "data.prompts_per_batch=2", "--set", "data.num_eval=2",
        "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=12", "--set", "model.tiny_width=32",
        "--set", "model.tiny_layers=1", "--set", "model.tiny_vision_width=32"]


@pytest.mark.slow
@pytest.mark.parametrize("config, extra, expected", [
    ("vigos_demo.py", ["--set", "distill.palr=true"],
     {"vigos/loss_perception", "vigos/loss_reasoning", "vigos/loss_reference", "vigos/valid_rows", "palr"}),
    ("grpo_vgs_demo.py", ["--set", "distill.gradient_stats_every=2"],
     {"vgs/std", "vgs/vis", "vgs/lp_fraction", "pg_loss", "adv/std"}),
])
def test_distillation_recipes_train_end_to_end(tmp_path, config, extra, expected):
  """The teacher is the warm start continued (saved in out_dir/teacher), its pass runs each step, and the step logs
  the method's terms (with the RL side's metrics when the losses are mixed, PALR when asked, and VGS's gradient
  statistics on every distill.gradient_stats_every-th step)."""
  out = tmp_path / "run"
  result = train.main(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", config),
                       "--set", f"train.out_dir={out}", *TINY, *extra])
  assert len(result["reward_curve"]) == 2
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  rl = [r for r in rows if r["step"] >= 0 and "reward/overall" in r]
  assert [r["step"] for r in rl] == [0, 1]
  for r in rl:
    assert expected <= set(r) and r["distill/loss"] >= 0.0 and np.isfinite(r["grad_norm"])
    if "palr" in expected:  # random completions are invalid ViGOS rollouts: no reasoning span, PALR 0 / 0 -> 0
      assert r["palr/skipped_batches"] == 0.0 and 0.0 <= r["palr"] <= 1.0
  measured = [r["step"] for r in rl if "vgs/grad/angle_lang_vis" in r]
  if "vgs/std" in expected:  # every 2nd step from step 0: step 0 measured, step 1 not
    assert measured == [0] and 0.0 <= rl[0]["vgs/grad/angle_lang_vis"] <= 180.0
    assert rl[0]["vgs/grad/norm_std"] > 0.0 and -1.0 <= rl[0]["vgs/grad/cos_std_vis"] <= 1.0
  else:
    assert measured == []
  assert os.path.isdir(out / "teacher" / "params") and os.path.isdir(out / "sft" / "params")
