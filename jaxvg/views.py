"""HTML views of a completion for notebooks: each token shaded by a score, and a completion's steps with their
dependency scores (`jaxvg.analysis.DependencyMaps`)."""

import html

import numpy as np


def token_pieces(tokenizer, tokens) -> list[str]:
  """Each token's piece of the decoded text. A character split over byte-level tokens goes to the token that completes
  it (the ones before get ""), so the pieces of well-formed UTF-8 concatenate to `tokenizer.decode(tokens)`."""
  tokens, pieces, start = [int(t) for t in tokens], [], 0
  for i in range(len(tokens)):
    text = tokenizer.decode(tokens[start:i + 1])
    # An unfinished UTF-8 sequence decodes to a trailing U+FFFD; a character spans at most 4 bytes, so 4 tokens.
    if text.endswith("\ufffd") and i + 1 < len(tokens) and i + 1 - start < 4:
      pieces.append("")
    else:
      pieces.append(text)
      start = i + 1
  return pieces


def tokens_html(tokenizer, tokens_T, scores_T, mask_T=None, *, vmax: float | None = None, label: str = "") -> str:
  """The completion as HTML spans, each token's background as red as its score (score / vmax, default the max)."""
  tokens_T, scores_T = np.asarray(tokens_T), np.asarray(scores_T, np.float64)
  mask_T = np.ones(tokens_T.shape, bool) if mask_T is None else np.asarray(mask_T, bool)
  vmax = float(scores_T[mask_T].max(initial=0.0)) if vmax is None else vmax
  spans = []
  for piece, s in zip(token_pieces(tokenizer, tokens_T[mask_T]), scores_T[mask_T]):
    alpha = 0.0 if vmax <= 0 else min(max(s / vmax, 0.0), 1.0) * 0.85
    spans.append(f'<span title="{s:.4g}" style="background: rgba(220, 38, 38, {alpha:.3f})">'
                 f'{html.escape(piece)}</span>')
  head = f"<div><b>{html.escape(label)}</b></div>" if label else ""
  return (f'{head}<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.6">'
          f'{"".join(spans)}</div>')


def steps_html(tokenizer, maps, row: int) -> str:
  """One completion's steps as an HTML table: text, V_k, KL sum, length and the Otsu cluster."""
  rows = []
  for k in range(int(maps.num_steps_N[row])):
    tokens = maps.tokens_NT[row][maps.step_ids_NT[row] == k].tolist()
    cluster = {1: "visual", 0: "textual"}.get(int(maps.step_visual_NC[row, k]), "-")
    rows.append(f"<tr><td>{k}</td><td>{cluster}</td><td>{maps.step_v_NC[row, k]:.3f}</td>"
                f"<td>{maps.step_kl_NC[row, k]:.3f}</td><td>{int(maps.step_len_NC[row, k])}</td>"
                f"<td style='text-align:left'>{html.escape(tokenizer.decode(tokens) if tokens else '')}</td></tr>")
  return ("<table><tr><th>step</th><th>cluster</th><th>V_k</th><th>KL sum</th><th>tokens</th><th>text</th></tr>"
          + "".join(rows) + f"</table><div>Otsu threshold on V: {maps.threshold:.3f}</div>")
