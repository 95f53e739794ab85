// mixexport_ort: serve a mixexport ONNX bundle from C++ through ONNX Runtime's C/C++ API, with the
// request path of the Python runtime (mixexport.runtime.Runtime):
//   - a `full` segment on flat rows (user inputs gathered by user_index, plus the items);
//   - a `user` segment once per user, its state kept in a byte-bounded LRU keyed by user id and a
//     digest of that user's input rows (so a changed profile is never served stale);
//   - a `cache` segment (LONGER / HyFormer K/V of the behaviour sequence) per user id: the same rows
//     again are a hit, rows slid left with new behaviours appended compute only the new positions;
//   - the `item` segment over the N candidates with the user state and user_index.
//
//   mixort::Scorer scorer("bundle/");                       // every check before any session exists
//   mixort::Request req = mixort::read_request(scorer, "request/");
//   mixort::Tensors out = scorer.score(req);                 // thread-safe: share one Scorer
//
// Errors are mixort::Error (a one-line message and the exit code the Python CLI uses: 1 a failed
// integrity check, 2 bad input or an unsupported bundle, 3 the environment cannot run it).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.hpp"

namespace mixort {

// A dense C-order tensor: numpy dtype name, shape, bytes (the .npy reader's type).
using Tensor = mixnpy::Array;
using Tensors = std::map<std::string, Tensor>;

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, int exit_code) : std::runtime_error(message), code(exit_code) {}
  int code;  // 1 integrity, 2 bad input / unsupported, 3 environment
};

// One request: U users × N candidates. `user` holds the user-side inputs (roles user and sequence,
// leading axis U), `item` the item inputs (leading axis N), `user_index` (int64 [N]) the user row of
// each candidate; `user_ids` (one per user, optional) key the per-user caches: without them
// nothing is cached, as in the Python runtime.
struct Request {
  Tensors user, item;
  Tensor user_index;
  std::vector<int64_t> user_ids;
  bool has_user_ids = false;
};

struct Options {
  size_t cache_bytes = 256ull * 1024 * 1024;  // per cache (user state, K/V), as DEFAULT_CACHE_BYTES
  std::string manifest_sha256;                 // "" = not pinned; else a manifest with other bytes is refused
};

struct CacheStats {
  int64_t hits = 0, misses = 0, evictions = 0, entries = 0, bytes = 0;
};
struct KvStats {
  int64_t hits = 0, appends = 0, misses = 0;
};

// Refuses (Error, exit 3) an ONNX Runtime library older than the headers this was compiled with;
// returns "ONNX Runtime <version> (API <n>)". Called by the Scorer; idempotent.
std::string init_runtime();

class Scorer {
 public:
  explicit Scorer(const std::string& bundle_dir, const Options& options = {});
  ~Scorer();
  Scorer(const Scorer&) = delete;
  Scorer& operator=(const Scorer&) = delete;

  // Raises Error (exit 2) naming the first input that does not match the manifest, with the Python
  // runtime's message (Runtime.check).
  void check(const Request& request) const;
  // Model outputs by name, one row per candidate. Safe to call from several threads at once.
  Tensors score(const Request& request, bool validate = true);

  const std::vector<std::string>& output_names() const;
  bool is_user_side(const std::string& input) const;  // true for roles user/sequence
  std::vector<std::string> input_names() const;
  CacheStats user_cache_stats() const;
  CacheStats kv_cache_stats() const;
  KvStats kv_stats() const;
  std::string describe() const;  // "layout full|user+item|cache+item|cache+user+item, N segment(s)"

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// A request from a directory: <input>.npy per model input, user_index.npy, optional user_ids.npy
// (int64 [U]). Any other .npy file is reported by check() as an unexpected input.
Request read_request(const Scorer& scorer, const std::string& dir);

}  // namespace mixort
