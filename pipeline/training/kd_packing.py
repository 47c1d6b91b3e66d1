"""Packing for `kd` (`packing: true`): several rows of stored teacher distributions in one sequence of at most
max_length tokens, and the padded batch of such sequences.

`pack_rows` turns each row (input_ids, completion_start and the teacher's top-K of each completion token) into
per-position columns, all as long as input_ids (the teacher's ids and log-probs are zeros on the prompt, and
`completion_mask` says which positions are scored), and packs them with TRL's `pack_dataset` (best-fit decreasing,
as TRL's SFT packing does; deterministic; no row is cut, as every row already fits in max_length). TRL records each
packed sequence's row lengths in `seq_lengths`.

`collate_packed` makes the batch: `position_ids` restart at 0 at each row, so attention stays within each row
(padding-free, as TRL's SFT packing). Transformers (5.x, `masking_utils.find_packed_sequence_indices`) reads row
boundaries from such position_ids when no 2D attention mask is given and builds the block-diagonal causal mask on the
eager and sdpa paths too; flash-attention reads them directly. So the model gets no attention mask; the batch's
`attention_mask` (1 on every real token) only counts tokens. Padding after the last row restarts at 0 as well: it is
a row of its own, attended by nothing else. `labels` are the completion tokens, -100 on every row's prompt, on
padding, and on each row's first token: the loss's shift pairs the label at position t with the hidden state at
t - 1, which at a row's first token is the previous row's last, so it is never scored (a row's first token is a
prompt token anyway: `kd` keeps only rows with a prompt).
"""

from __future__ import annotations

import torch

from pipeline.core.errors import UserError

# Attention implementations that keep packed rows apart given restarting position_ids and no 2D mask.
PACKED_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_attention(model, step: str = "kd") -> None:
    """Refuse packing with an attention implementation that might let a row attend to the row before it."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in PACKED_ATTENTION:
        raise UserError(f"{step}: packing needs an attention implementation that keeps packed rows apart "
                        f"({', '.join(PACKED_ATTENTION)}); the model has attn_implementation={implementation!r}: "
                        "set packing: false")


def pack_rows(rows, max_length: int, k: int):
    """Rows (input_ids, completion_start, teacher_topk_ids, teacher_topk_logprobs) -> packed sequences of at most
    max_length tokens with per-position columns and `seq_lengths` (TRL best-fit decreasing)."""
    from trl.data_utils import pack_dataset

    def per_position(row):
        start, length = row["completion_start"], len(row["input_ids"])
        zeros = [[0] * k] * start
        return {"completion_mask": [0] * start + [1] * (length - start),
                "teacher_topk_ids": zeros + row["teacher_topk_ids"],
                "teacher_topk_logprobs": [[0.0] * k] * start + row["teacher_topk_logprobs"]}

    columns = rows.map(per_position, remove_columns=["completion_start"], keep_in_memory=True)
    columns = columns.select_columns(["input_ids", "completion_mask", "teacher_topk_ids", "teacher_topk_logprobs"])
    return pack_dataset(columns, max_length, strategy="bfd", map_kwargs={"keep_in_memory": True})


def collate_packed(sequences: list[dict], pad_token_id: int, k: int) -> dict:
    """Packed sequences -> input_ids, position_ids (restarting at each row and at the padding), attention_mask (real
    tokens, for counting only), labels and the per-position teacher, padded to the longest sequence."""
    from pipeline.training.kd_loss import pack_teacher

    longest = max(len(sequence["input_ids"]) for sequence in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, longest), dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    labels = torch.full((batch, longest), -100, dtype=torch.long)
    teacher_ids = torch.zeros((batch, longest, k), dtype=torch.long)
    teacher_logprobs = torch.zeros((batch, longest, k), dtype=torch.float32)
    for i, sequence in enumerate(sequences):
        length = len(sequence["input_ids"])
        input_ids[i, :length] = torch.tensor(sequence["input_ids"])
        attention_mask[i, :length] = 1
        position_ids[i, :length] = torch.cat([torch.arange(n) for n in sequence["seq_lengths"]])
        position_ids[i, length:] = torch.arange(longest - length)
        scored = torch.tensor(sequence["completion_mask"], dtype=torch.bool)
        scored[position_ids[i, :length] == 0] = False  # a row's first token is never predicted from the row before
        labels[i, :length] = torch.where(scored, input_ids[i, :length], -100)
        teacher_ids[i, :length] = torch.tensor(sequence["teacher_topk_ids"], dtype=torch.long)
        teacher_logprobs[i, :length] = torch.tensor(sequence["teacher_topk_logprobs"], dtype=torch.float32)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask, "labels": labels,
            "teacher": pack_teacher(teacher_ids, teacher_logprobs)}
