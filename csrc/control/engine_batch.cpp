#include "engine_batch.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "command_payload.h"
#include "scheduler.h"

namespace py = pybind11;

namespace pie::control {
namespace {

int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A Python list of the values (one allocation for the list, one int object each).
template <typename Values>
py::list int_list(const Values& values) {
  py::list out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = py::int_(values[i]);
  return out;
}

// The ForwardCommands of `commands`: a Batch (its payloads, read in place: no Python object per command)
// or a sequence of pie.control.ForwardCommand.
std::vector<ForwardCommand*> commands_of(py::handle commands) {
  std::vector<ForwardCommand*> out;
  if (py::isinstance<Batch>(commands)) {
    const Batch& batch = commands.cast<const Batch&>();
    out.resize(batch.size());
    for (size_t r = 0; r < batch.size(); ++r) {
      const Payload& payload = batch.command(r).payload;
      if (!payload || payload.release_function() != &release_command<ForwardCommand>)
        throw std::invalid_argument("command " + std::to_string(r) + " of the batch is not a ForwardCommand");
      out[r] = static_cast<std::shared_ptr<ForwardCommand>*>(payload.get())->get();
    }
    return out;
  }
  auto sequence = py::reinterpret_borrow<py::sequence>(commands);
  out.resize(py::len(sequence));
  for (size_t r = 0; r < out.size(); ++r) out[r] = &sequence[r].cast<ForwardCommand&>();
  return out;
}

}  // namespace

void write_command_outputs(ForwardCommand& c, py::sequence outputs, size_t offset) {
  std::vector<OutputValue> results(c.outputs.size());
  for (size_t j = 0; j < c.outputs.size(); ++j) {
    py::object value = outputs[offset + j];
    OutputValue& r = results[j];
    switch (c.outputs[j].sampler.kind) {
      case SamplerKind::kGreedy:
      case SamplerKind::kSample:
        r.ids.push_back(value.cast<uint32_t>());
        break;
      case SamplerKind::kTopKDistribution: {
        auto pair = value.cast<py::sequence>();
        r.ids = pair[0].cast<std::vector<uint32_t>>();
        r.values = pair[1].cast<std::vector<float>>();
        break;
      }
      case SamplerKind::kLogprobs:
        r.ids = c.outputs[j].sampler.token_ids;
        r.values = value.cast<std::vector<float>>();
        break;
      case SamplerKind::kRawLogits: {  // a (vocab,) CPU tensor or array
        auto row = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(value);
        if (!row) throw py::error_already_set();
        r.values.assign(row.data(), row.data() + row.size());
        break;
      }
    }
  }
  c.results = std::move(results);
  c.pins.reset();  // the pass has run: its pages may go back to the pool once their holders let go
}

void bind_engine_batch(py::module_& m) {
  m.def(
      "pack_forward",
      [](py::object commands, uint32_t page_size, py::object greedy, py::object to_sampler) {
        if (page_size == 0) throw std::invalid_argument("page_size: 0");
        const std::vector<ForwardCommand*> cs = commands_of(commands);
        const size_t num_commands = cs.size();
        size_t num_tokens = 0, num_outputs = 0, num_pages = 0;
        for (size_t r = 0; r < num_commands; ++r) {
          num_tokens += cs[r]->token_ids.size();
          num_outputs += cs[r]->outputs.size();
          num_pages += cs[r]->kv_page_ids.size();
        }
        py::list token_ids(num_tokens), positions(num_tokens), output_rows(num_outputs), samplers(num_outputs);
        py::list qo_lens(num_commands), last_page_len(num_commands), masks(num_commands);
        py::array_t<int64_t> page_ids(static_cast<py::ssize_t>(num_pages));
        py::array_t<int64_t> page_indptr(static_cast<py::ssize_t>(num_commands + 1));
        int64_t* page_out = page_ids.mutable_data();
        int64_t* page_bounds = page_indptr.mutable_data();
        page_bounds[0] = 0;
        py::list mask_rows, mask_runs, embed_slots, adapters(num_commands);
        bool any_adapter = false;
        py::array_t<int64_t> write_slots(static_cast<py::ssize_t>(num_tokens));
        int64_t* slots = write_slots.mutable_data();
        size_t row = 0, out = 0;
        const int64_t now = steady_now_ns();
        for (size_t r = 0; r < num_commands; ++r) {
          ForwardCommand& c = *cs[r];
          c.batch_size = static_cast<uint32_t>(num_commands);
          c.batch_tokens = static_cast<uint32_t>(num_tokens);
          c.run_start_ns = now;
          const size_t t = c.token_ids.size();
          // the K/V of the T input tokens go to the sequence's last T slots (checked: kv_len >= T)
          const uint64_t kv_len = c.kv_len(page_size);
          for (size_t i = 0; i < t; ++i) {
            token_ids[row + i] = py::int_(c.token_ids[i]);
            positions[row + i] = py::int_(c.positions[i]);
            const uint64_t seq = kv_len - t + i;
            slots[row + i] = int64_t(c.kv_page_ids[seq / page_size]) * page_size + int64_t(seq % page_size);
          }
          qo_lens[r] = py::int_(t);
          page_out = std::copy(c.kv_page_ids.begin(), c.kv_page_ids.end(), page_out);
          page_bounds[r + 1] = page_bounds[r] + int64_t(c.kv_page_ids.size());
          last_page_len[r] = py::int_(c.kv_last_page_len);
          adapters[r] = py::int_(c.adapter);
          any_adapter = any_adapter || c.adapter != 0;
          masks[r] = c.mask.empty() ? py::object(py::none()) : py::cast(c.mask);
          if (!c.embed_slots.empty()) embed_slots.append(py::make_tuple(row, int_list(c.embed_slots)));
          for (const ForwardOutput& o : c.outputs) {
            output_rows[out] = py::int_(row + o.index);
            samplers[out] = o.sampler.kind == SamplerKind::kGreedy ? greedy : to_sampler(o.sampler);
            if (!o.vocab_mask.empty()) {
              mask_rows.append(py::int_(out));
              mask_runs.append(int_list(o.vocab_mask));
            }
            ++out;
          }
          row += t;
        }
        py::dict fields;
        fields["page_size"] = page_size;
        fields["token_ids"] = token_ids;
        fields["positions"] = positions;
        fields["write_slots"] = write_slots;
        fields["output_rows"] = output_rows;
        fields["qo_lens"] = qo_lens;
        fields["page_ids"] = page_ids;
        fields["page_indptr"] = page_indptr;
        fields["last_page_len"] = last_page_len;
        fields["masks"] = masks;
        fields["samplers"] = samplers;
        fields["output_mask_rows"] = mask_rows;
        fields["output_mask_runs"] = mask_runs;
        fields["adapters"] = any_adapter ? py::object(adapters) : py::object(py::none());
        fields["embed_slots"] = py::len(embed_slots) ? py::object(embed_slots) : py::object(py::none());
        return fields;
      },
      py::arg("commands"), py::arg("page_size"), py::arg("greedy"), py::arg("to_sampler"),
      "The FORWARD commands (a sequence of ForwardCommand, or a Batch: its commands in place) as the fields of one pie.engine.ragged_batch.RaggedBatch (write_slots as an int64 "
      "array; embed_slots: None or (first row, slots) per command with input embeddings); every greedy output's "
      "sampler is `greedy`, the others to_sampler(sampler).");
  m.def(
      "write_batch_outputs",
      [](py::object commands, py::sequence outputs) {
        const std::vector<ForwardCommand*> cs = commands_of(commands);
        size_t num_outputs = 0;
        for (ForwardCommand* c : cs) num_outputs += c->outputs.size();
        if (py::len(outputs) != num_outputs)
          throw std::invalid_argument(std::to_string(py::len(outputs)) + " outputs for " +
                                      std::to_string(num_outputs) + " samplers");
        size_t offset = 0;
        const int64_t now = steady_now_ns();
        for (ForwardCommand* c : cs) {
          write_command_outputs(*c, outputs, offset);
          offset += c->outputs.size();
          c->run_end_ns = now;
        }
      },
      py::arg("commands"), py::arg("outputs"),
      "Write the engine's (M,) outputs of a packed batch, in order, into the commands' results (a sequence or the Batch) (as "
      "ForwardCommand.write_outputs for each); their pages are unpinned.");
}

}  // namespace pie::control
