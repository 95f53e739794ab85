// Id ranges of integer inputs, from the manifest (model.inputs[k].ids, found in the graph by
// mixexport/program/ids.py; older manifests carry only `vocab`: 0 <= id < vocab), and the request check
// that refuses ids outside them before anything runs — negative ids included: an ONNX Gather or an
// AOTI index would wrap -1 to the last row, and mixexport never wraps or clamps an id. The message is
// mixexport.specs.check_feeds's, word for word.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace mixids {

// A request the bundle refuses (exit 2 in the scorers), as opposed to a broken bundle or a bug.
struct BadRequest : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Range {
  bool known = false;    // false: no range was found for this column (nothing is checked)
  int64_t low = 0;
  bool bounded = false;  // false: any id >= low (the model hashes or clamps ids itself)
  int64_t high = 0;      // exclusive
};

// One range for every element, or one per last-axis column; empty: not an id input.
inline std::vector<Range> read(const nlohmann::json& entry, const std::string& where) {
  std::vector<Range> out;
  auto integer = [&](const nlohmann::json& v, const std::string& what) {
    if (!v.is_number_integer()) throw std::runtime_error("manifest: " + where + what + " must be an integer");
    return v.get<int64_t>();
  };
  if (entry.contains("ids") && entry["ids"].is_array()) {
    for (size_t k = 0; k < entry["ids"].size(); ++k) {
      const auto& r = entry["ids"][k];
      Range x;
      if (r.is_object()) {
        std::string at = ".ids[" + std::to_string(k) + "]";
        x.known = true;
        x.low = r.contains("low") ? integer(r["low"], at + ".low") : 0;
        x.bounded = r.contains("high") && !r["high"].is_null();
        if (x.bounded) x.high = integer(r["high"], at + ".high");
      } else if (!r.is_null()) {
        throw std::runtime_error("manifest: " + where + ".ids[" + std::to_string(k) + "] must be an object or null");
      }
      out.push_back(x);
    }
  } else if (entry.contains("vocab") && !entry["vocab"].is_null()) {
    const auto& v = entry["vocab"];
    for (const auto& b : v.is_array() ? v : nlohmann::json::array({v})) {
      Range x;
      x.known = x.bounded = true;
      x.high = integer(b, ".vocab");
      out.push_back(x);
    }
  }
  return out;
}

inline std::string allows(const Range& r) {
  return r.bounded ? std::to_string(r.low) + " <= id < " + std::to_string(r.high) : "id >= " + std::to_string(r.low);
}

// True when every element is inside its column's range: the one scan a request that passes costs
// (no counting, no message). at(i): element i (C order) as int64.
template <class At>
bool in_range(const std::vector<int64_t>& shape, int64_t numel, const std::vector<Range>& ranges, At at) {
  const int64_t cols = static_cast<int64_t>(ranges.size());
  if (cols == 0 || numel == 0) return true;
  if (cols > 1 && (shape.size() < 2 || shape.back() != cols)) return true;  // the shape check refuses that
  for (int64_t i = 0, c = 0; i < numel; ++i, c = c + 1 == cols ? 0 : c + 1) {
    const Range& r = ranges[static_cast<size_t>(c)];
    if (!r.known) continue;
    int64_t v = at(i);
    if (v < r.low || (r.bounded && v >= r.high)) return false;
  }
  return true;
}

// Throws BadRequest naming `head` ("item input 'item_id'"), the column, how many ids are bad, the
// allowed range and the first bad id with its index. at(i): element i (C order) as int64.
template <class At>
void check(const std::string& head, const std::vector<int64_t>& shape, int64_t numel, const std::vector<Range>& ranges,
           At at) {
  if (in_range(shape, numel, ranges, at)) return;
  const int64_t cols = static_cast<int64_t>(ranges.size());
  std::vector<int64_t> bad(static_cast<size_t>(cols), 0);
  int64_t first = -1, total = 0;
  for (int64_t i = 0; i < numel; ++i) {
    const Range& r = ranges[static_cast<size_t>(i % cols)];
    if (!r.known) continue;
    int64_t v = at(i);
    if (v < r.low || (r.bounded && v >= r.high)) {
      ++bad[static_cast<size_t>(i % cols)];
      ++total;
      if (first < 0) first = i;
    }
  }
  if (first < 0) return;
  const int64_t col = first % cols, count = cols > 1 ? bad[static_cast<size_t>(col)] : total;
  std::vector<int64_t> index(shape.size());
  for (int64_t k = static_cast<int64_t>(shape.size()) - 1, rest = first; k >= 0; --k) {
    index[static_cast<size_t>(k)] = shape[static_cast<size_t>(k)] ? rest % shape[static_cast<size_t>(k)] : 0;
    rest = shape[static_cast<size_t>(k)] ? rest / shape[static_cast<size_t>(k)] : 0;
  }
  std::string where = "[";
  for (size_t k = 0; k < index.size(); ++k) where += (k ? ", " : "") + std::to_string(index[k]);
  where += "]";
  throw BadRequest(head + (cols > 1 ? " column " + std::to_string(col) : "") + ": " + std::to_string(count) + " id" +
                   (count > 1 ? "s" : "") + " outside its vocabulary (expected " + allows(ranges[static_cast<size_t>(col)]) +
                   "), first " + std::to_string(at(first)) + " at index " + where +
                   (total > count ? "; " + std::to_string(total - count) + " more in other columns" : ""));
}

}  // namespace mixids
