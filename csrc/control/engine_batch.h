// The control layer's FORWARD batch as the engine's one input, and the engine's outputs back into the
// commands: the two crossings of a forward pass between the control layer and the model runner, one
// call each per batch (pie/control/handlers.py).
//
// `commands` is a sequence of ForwardCommand or a Batch of them (read in place: the batch loop's fast path
// creates no Python object per command).
// pack_forward(commands, page_size, greedy, to_sampler) -> dict of pie.engine.ragged_batch.RaggedBatch's
// fields, the commands' rows back to back (command r owns rows starts[r] .. starts[r] + T_r):
//   token_ids (N,), positions (N,), write_slots (N,) int64 numpy (the last T_r slots of each sequence),
//   qo_lens (R,), page_ids (P,) and page_indptr (R+1,) int64 numpy (the flat page table),
//   last_page_len (R,), masks (R,) BRLE rows or None, output_rows (M,),
//   samplers (M,) (`greedy` for every greedy output, else to_sampler(pie.control.Sampler)),
//   output_mask_rows (K,) / output_mask_runs (K,) for the outputs with a vocabulary mask,
//   adapters: None when no command names a LoRA adapter, else (R,) each command's adapter (0: none), and
//   embed_slots: None, or (row, slots) per command that reads input embeddings.
// write_batch_outputs(commands, outputs): the (M,) engine outputs, in the same order, into each command's
//   results (as ForwardCommand.write_outputs, one command after the other); unpins their pages.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>

#include "forward_command.h"

namespace pie::control {

// Writes outputs[offset .. offset + command.outputs.size()) as the command's results (the engine's output of
// each sampler kind: a token id, (ids, probs), logprobs, a logits row) and unpins its pages.
void write_command_outputs(ForwardCommand& command, pybind11::sequence outputs, size_t offset);

// Adds pack_forward and write_batch_outputs to the module.
void bind_engine_batch(pybind11::module_& m);

}  // namespace pie::control
