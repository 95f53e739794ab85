// mixexport_ort: the ONNX Runtime serving core (see mixexport_ort.hpp). Every step mirrors
// mixexport/runtime.py (request path, caches), mixexport/specs.py (request checks, same messages),
// mixexport/backends/onnxruntime.py (session options, interface check) and mixexport/trust.py
// (path rule, sha256 before load): a C++ server scores what the Python runtime scores.
#define ORT_API_MANUAL_INIT  // the API table is fetched by init_runtime(), after the version check
#include "mixexport_ort.hpp"

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <list>
#include <mutex>
#include <regex>
#include <set>
#include <sstream>
#include <unordered_map>

#include "bundle.hpp"
#include "ids.hpp"

namespace mixort {
namespace {

using mixbundle::json;
using mixbundle::shown;

// ---------------------------------------------------------------------------------------------
// tensors: the few layout operations the runtime needs (rows of a user, slices of a sequence)

struct DType {
  const char* name;
  ONNXTensorElementDataType onnx;
  size_t size;
};
const DType kDTypes[] = {
    {"float32", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 4},   {"float16", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2},
    {"bfloat16", ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, 2}, {"float64", ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE, 8},
    {"int64", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 8},     {"int32", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, 4},
    {"int16", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16, 2},     {"int8", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 1},
    {"uint8", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 1},     {"bool", ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, 1},
};
const DType* dtype_of(const std::string& name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}
const DType* dtype_of(ONNXTensorElementDataType t) {
  for (const auto& d : kDTypes)
    if (t == d.onnx) return &d;
  return nullptr;
}

int64_t prod(const std::vector<int64_t>& shape, size_t from, size_t to) {
  int64_t n = 1;
  for (size_t k = from; k < to; ++k) n *= shape[k];
  return n;
}

// t.take(idx, axis): the rows idx along `axis`, in that order.
Tensor take(const Tensor& t, size_t axis, const std::vector<int64_t>& idx) {
  Tensor out{t.dtype, t.shape, {}, t.itemsize};
  out.shape[axis] = static_cast<int64_t>(idx.size());
  int64_t outer = prod(t.shape, 0, axis), dim = t.shape[axis];
  size_t inner = static_cast<size_t>(prod(t.shape, axis + 1, t.shape.size())) * t.itemsize;
  out.data.resize(static_cast<size_t>(outer) * idx.size() * inner);
  char* dst = out.data.data();
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i : idx) {
      std::memcpy(dst, t.data.data() + (static_cast<size_t>(o * dim + i)) * inner, inner);
      dst += inner;
    }
  return out;
}

// t[start:stop] along `axis`.
Tensor slice(const Tensor& t, size_t axis, int64_t start, int64_t stop) {
  std::vector<int64_t> idx;
  for (int64_t i = start; i < stop; ++i) idx.push_back(i);
  return take(t, axis, idx);
}

Tensor concat(const std::vector<const Tensor*>& parts, size_t axis) {
  Tensor out{parts[0]->dtype, parts[0]->shape, {}, parts[0]->itemsize};
  out.shape[axis] = 0;
  for (const Tensor* p : parts) out.shape[axis] += p->shape[axis];
  int64_t outer = prod(out.shape, 0, axis);
  size_t inner = static_cast<size_t>(prod(out.shape, axis + 1, out.shape.size())) * out.itemsize;
  out.data.resize(static_cast<size_t>(outer * out.shape[axis]) * inner);
  char* dst = out.data.data();
  for (int64_t o = 0; o < outer; ++o)
    for (const Tensor* p : parts) {
      size_t n = static_cast<size_t>(p->shape[axis]) * inner;
      std::memcpy(dst, p->data.data() + static_cast<size_t>(o) * n, n);
      dst += n;
    }
  return out;
}

bool same(const Tensor& a, const Tensor& b) { return a.dtype == b.dtype && a.shape == b.shape && a.data == b.data; }

// Python's repr of a list of names / of a shape with names and sizes.
std::string pylist(const std::vector<std::string>& items, bool quote_all = true) {
  std::string out = "[";
  for (size_t k = 0; k < items.size(); ++k) {
    bool number = !quote_all && !items[k].empty() && std::isdigit(static_cast<unsigned char>(items[k][0]));
    out += (k ? ", " : "") + (number ? items[k] : shown(items[k]));
  }
  return out + "]";
}
std::string pyints(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (size_t k = 0; k < v.size(); ++k) out += (k ? ", " : "") + std::to_string(v[k]);
  return out + "]";
}
std::vector<int64_t> unravel(int64_t flat, const std::vector<int64_t>& shape) {
  std::vector<int64_t> at(shape.size());
  for (size_t k = shape.size(); k-- > 0;) {
    at[k] = flat % shape[k];
    flat /= shape[k];
  }
  return at;
}
bool is_static(const std::string& dim) { return !dim.empty() && std::isdigit(static_cast<unsigned char>(dim[0])); }
// A static dim's size (-1 when it does not fit: then it matches no tensor).
int64_t size_of(const std::string& dim) {
  errno = 0;
  long long v = std::strtoll(dim.c_str(), nullptr, 10);
  return errno ? -1 : static_cast<int64_t>(v);
}

// ---------------------------------------------------------------------------------------------
// the per-user caches: an LRU bounded by bytes, as mixexport.runtime.UserStateCache

using Entry = std::shared_ptr<const Tensors>;

class LruCache {
 public:
  explicit LruCache(size_t max_bytes) : max_(max_bytes) {}
  Entry get(const std::string& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it == index_.end()) {
      ++stats_.misses;
      return nullptr;
    }
    order_.splice(order_.end(), order_, it->second);
    ++stats_.hits;
    return it->second->value;
  }
  void put(const std::string& key, Entry value) {
    size_t size = 0;
    for (const auto& kv : *value) size += kv.second.data.size();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      stats_.bytes -= static_cast<int64_t>(it->second->size);
      order_.erase(it->second);
      index_.erase(it);
    }
    if (size > max_) return;  // one entry larger than the whole cache is not kept
    order_.push_back({key, std::move(value), size});
    index_[key] = std::prev(order_.end());
    stats_.bytes += static_cast<int64_t>(size);
    while (stats_.bytes > static_cast<int64_t>(max_)) {
      stats_.bytes -= static_cast<int64_t>(order_.front().size);
      index_.erase(order_.front().key);
      order_.pop_front();
      ++stats_.evictions;
    }
    stats_.entries = static_cast<int64_t>(index_.size());
  }
  CacheStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  struct Item {
    std::string key;
    Entry value;
    size_t size;
  };
  size_t max_;
  mutable std::mutex mu_;
  std::list<Item> order_;
  std::unordered_map<std::string, std::list<Item>::iterator> index_;
  CacheStats stats_;
};

// ---------------------------------------------------------------------------------------------
// ONNX Runtime

Ort::Env& env() {
  // one per process; FATAL only: every error reaches the caller as an exception, stderr stays one line
  static Ort::Env e(ORT_LOGGING_LEVEL_FATAL, "mixexport");
  return e;
}

const char* kLevels[] = {"ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"};
const GraphOptimizationLevel kLevelValues[] = {ORT_DISABLE_ALL, ORT_ENABLE_BASIC, ORT_ENABLE_EXTENDED, ORT_ENABLE_ALL};

// mixexport/manifest_check.py ORT_CONFIG: the config entries a bundle may set, with their values.
const std::vector<std::pair<std::string, std::string>>& allowed_config() {
  static const std::vector<std::pair<std::string, std::string>> list = {
      {"session.qdq_matmulnbits_accuracy_level", "[0-4]"},
      {"session.intra_op.allow_spinning", "[01]"},
      {"session.inter_op.allow_spinning", "[01]"},
      {"optimization.disable_specified_optimizers", "[A-Za-z0-9_]{1,64}(;[A-Za-z0-9_]{1,64}){0,63}"},
      {"session.disable_quant_qdq", "[01]"}, {"session.disable_prepacking", "[01]"},
      {"session.set_denormal_as_zero", "[01]"}, {"session.disable_aot_function_inlining", "[01]"},
      {"session.disable_cpu_ep_fallback", "[01]"}, {"session.disable_double_qdq_remover", "[01]"},
      {"session.enable_quant_qdq_cleanup", "[01]"}, {"session.use_env_allocators", "[01]"}};
  return list;
}

// The backend's defaults (mixexport/backends/onnxruntime.py DEFAULT_OPTIONS) for a segment without options.
json default_options() {
  return json{{"graph_optimization_level", "ORT_ENABLE_ALL"},
              {"config",
               {{"session.qdq_matmulnbits_accuracy_level", "0"},
                {"session.intra_op.allow_spinning", "0"},
                {"optimization.disable_specified_optimizers", "SkipLayerNormFusion;QDQSelectorActionTransformer"}}}};
}

Ort::SessionOptions session_options(const json& options, const std::string& where) {
  auto bad = [&](const std::string& what) { return Error("manifest: " + where + " " + what, 2); };
  Ort::SessionOptions so;
  for (const auto& kv : options.items())
    if (kv.key() != "graph_optimization_level" && kv.key() != "config" && kv.key() != "intra_op_num_threads")
      throw bad("holds " + shown(kv.key()) + ", which a bundle may not set (known: graph_optimization_level, config, "
                "intra_op_num_threads)");
  const json& level = options.contains("graph_optimization_level") ? options["graph_optimization_level"] : json();
  int chosen = -1;
  for (int k = 0; k < 4; ++k)
    if (level.is_string() && level.get<std::string>() == kLevels[k]) chosen = k;
  if (chosen < 0) throw bad("graph_optimization_level is " + level.dump() + ", expected one of " + pylist({kLevels, kLevels + 4}));
  so.SetGraphOptimizationLevel(kLevelValues[chosen]);
  if (options.contains("intra_op_num_threads") && !options["intra_op_num_threads"].is_null()) {
    const json& n = options["intra_op_num_threads"];
    if (!n.is_number_unsigned() || n.get<uint64_t>() > 1024) throw bad("intra_op_num_threads must be in [0, 1024]");
    if (n.get<uint64_t>() > 0) so.SetIntraOpNumThreads(static_cast<int>(n.get<uint64_t>()));
  }
  if (options.contains("config")) {
    if (!options["config"].is_object()) throw bad("config must be an object");
    for (const auto& kv : options["config"].items()) {
      auto rule = std::find_if(allowed_config().begin(), allowed_config().end(),
                               [&](const auto& p) { return p.first == kv.key(); });
      if (rule == allowed_config().end()) throw bad("config sets " + shown(kv.key()) + ", which a bundle may not set");
      std::string value = kv.value().is_string() ? kv.value().get<std::string>()
                          : kv.value().is_number_integer() ? kv.value().dump() : "";
      if (!std::regex_match(value, std::regex(rule->second)))
        throw bad("config[" + shown(kv.key()) + "] is " + kv.value().dump() + ", not a value ONNX Runtime takes (" +
                  rule->second + ")");
      so.AddConfigEntry(kv.key().c_str(), value.c_str());
    }
  }
  return so;
}

std::string read_bytes(const std::string& path, const std::string& rel) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + rel + ": check the bundle's file permissions", 2);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return bytes;
}

}  // namespace

std::string init_runtime() {
  static std::once_flag once;
  static std::string error, text;
  std::call_once(once, [] {
    const OrtApiBase* base = OrtGetApiBase();
    const char* version = base->GetVersionString();
    const OrtApi* api = base->GetApi(ORT_API_VERSION);  // null from a library older than the headers
    if (!api) {
      error = std::string("the ONNX Runtime library is ") + version + ", older than the headers this scorer was built with "
              "(API " + std::to_string(ORT_API_VERSION) + "): use the onnxruntime wheel it was built against, or newer";
      return;
    }
    Ort::InitApi(api);
    text = std::string("ONNX Runtime ") + version + " (API " + std::to_string(ORT_API_VERSION) + ")";
  });
  if (!error.empty()) throw Error(error, 3);
  return text;
}

// ---------------------------------------------------------------------------------------------
// the scorer

struct Scorer::Impl {
  struct Seg {
    std::string name, role, file;
    std::vector<mixbundle::Spec> inputs, outputs;
    std::unique_ptr<Ort::Session> session;
    std::vector<const char*> in_names, out_names;
    std::map<std::string, size_t> axis_in, axis_out;  // where each tensor's users axis is
  };
  struct InputSpec {
    mixbundle::Spec spec;
    std::vector<mixids::Range> ids;  // one range, or one per last-axis column; empty = not an id input
    // spec.shape parsed once at open, so a request check compares integers: the static size of each
    // axis (-1 for one too large to fit: it matches no tensor), or kSymbolic for a named axis
    std::vector<int64_t> sizes;
  };
  static constexpr int64_t kSymbolic = INT64_MIN;

  mixbundle::Bundle bundle;
  std::vector<InputSpec> user_specs, item_specs;
  std::vector<std::string> outputs;
  std::vector<Seg> segs;  // run order: cache, user | full, item
  Seg *full = nullptr, *cache_seg = nullptr, *user_seg = nullptr, *item_seg = nullptr;
  std::map<std::string, std::pair<std::string, int64_t>> multiples;  // axis -> (base, k)
  std::map<std::string, int64_t> minimums;
  std::map<std::string, int64_t> maximums;  // a .pt2's Dim(max=): the program runs up to there
  json kv_spec;  // caches[0], or null
  LruCache cache, kv;
  KvStats kv_counts;
  std::mutex kv_mu;
  Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

  Impl(const std::string& root, const Options& o) : cache(o.cache_bytes), kv(o.cache_bytes) {
    try {
      bundle = mixbundle::load(root, o.manifest_sha256);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      std::string m = e.what();
      bool trust = m.find("breaks the bundle path rule") != std::string::npos || m.find("not the pinned") != std::string::npos;
      throw Error(m, trust ? 1 : 2);
    }
    const json& m = bundle.data;
    if (m.contains("tables") && m["tables"].is_array() && !m["tables"].empty())
      throw Error("bundle has " + std::to_string(m["tables"].size()) + " embedding table(s) outside the engine (manifest "
                  "'tables'), which mixexport_score_ort does not serve: serve it with the Python runtime", 2);
    read_model(m);
    open_segments(m);
  }

  void read_model(const json& m) {
    const json& model = m["model"];
    size_t k = 0;
    for (const auto& spec : bundle.inputs) {
      InputSpec s{spec, {}, {}};
      for (const auto& dim : spec.shape) s.sizes.push_back(is_static(dim) ? size_of(dim) : kSymbolic);
      const json& entry = model["inputs"][k++];
      try {  // "ids" (ranges found in the graph), else the older "vocab"
        s.ids = mixids::read(entry, "model.inputs[" + std::to_string(k - 1) + "]");
      } catch (const std::runtime_error& e) {
        throw Error(e.what(), 2);
      }
      (spec.user_side() ? user_specs : item_specs).push_back(s);
    }
    for (const auto& spec : bundle.outputs) outputs.push_back(spec.name);
    if (model.contains("multiples") && model["multiples"].is_object())
      for (const auto& kv : model["multiples"].items()) {
        if (!kv.value().is_array() || kv.value().size() != 2 || !kv.value()[0].is_string() || !kv.value()[1].is_number_integer())
          throw Error("manifest: model.multiples[" + shown(kv.key()) + "] must be [axis name, factor]", 2);
        multiples[kv.key()] = {kv.value()[0].get<std::string>(), kv.value()[1].get<int64_t>()};
      }
    if (model.contains("minimums") && model["minimums"].is_object())
      for (const auto& kv : model["minimums"].items()) {
        if (!kv.value().is_number_integer()) throw Error("manifest: model.minimums[" + shown(kv.key()) + "] must be an integer", 2);
        minimums[kv.key()] = kv.value().get<int64_t>();
      }
    if (model.contains("maximums") && model["maximums"].is_object())
      for (const auto& kv : model["maximums"].items()) {
        if (!kv.value().is_number_integer()) throw Error("manifest: model.maximums[" + shown(kv.key()) + "] must be an integer", 2);
        maximums[kv.key()] = kv.value().get<int64_t>();
      }
    if (m.contains("caches") && m["caches"].is_array() && !m["caches"].empty()) kv_spec = m["caches"][0];
  }

  void open_segments(const json& m) {
    static const std::map<std::string, int> order = {{"cache", 0}, {"full", 1}, {"user", 1}, {"item", 2}};
    std::vector<const mixbundle::Segment*> sorted;
    for (const auto& s : bundle.segments) sorted.push_back(&s);
    std::stable_sort(sorted.begin(), sorted.end(), [&](auto* a, auto* b) { return order.at(a->role) < order.at(b->role); });
    // every file is read, hashed and checked before the first session exists; the session is then
    // built from those same bytes, so what ran is what was checked (no re-read between the two)
    std::vector<std::string> models;
    for (const auto* s : sorted) {
      const json& entry = *std::find_if(m["segments"].begin(), m["segments"].end(),
                                        [&](const json& e) { return e["name"] == s->name; });
      std::string rel = entry["file"].get<std::string>();
      std::string path = bundle.file(rel);
      auto digest = bundle.files.find(rel);
      if (digest == bundle.files.end())
        throw Error(rel + " has no sha256 in the manifest's files; refusing to load an unverified file", 1);
      if (!mixbundle::fs::is_regular_file(path))
        throw Error(rel + " is missing from the bundle (or is not a regular file); refusing to load it", 1);
      models.push_back(read_bytes(path, rel));
      if (mixsha::hex(models.back().data(), models.back().size()) != digest->second)
        throw Error(rel + " does not match its sha256 in the manifest (changed after the build); refusing to load it", 1);
      // ONNX names an external-data file in an entry whose key is "location" (protobuf bytes: field 1,
      // length 8, the key); from bytes ORT would resolve it against the working directory, outside
      // the bundle's checks: such segments are refused
      if (models.back().find(std::string("\x0a\x08location", 10)) != std::string::npos)
        throw Error(rel + " stores tensors in external-data files, which mixexport_score_ort does not load: serve "
                    "this bundle with the Python runtime", 2);
      segs.push_back(Seg{s->name, s->role, rel, s->inputs, s->outputs, nullptr, {}, {}, {}, {}});
      std::string backend = entry.contains("backend") && entry["backend"].is_string() ? entry["backend"].get<std::string>() : "";
      json options = entry.contains("session_options") && entry["session_options"].is_object() && backend == "onnxruntime"
                         ? entry["session_options"] : json::object();
      session_of(segs.back(), options.empty() ? default_options() : options, "segments[" + shown(s->name) + "].session_options");
    }
    for (auto& s : segs) {  // segs is complete: the pointers stay valid
      if (s.role == "full") full = &s;
      if (s.role == "cache") cache_seg = &s;
      if (s.role == "user") user_seg = &s;
      if (s.role == "item") item_seg = &s;
    }
    if (cache_seg) check_kv_spec();
    for (size_t k = 0; k < segs.size(); ++k) create(segs[k], models[k]);
  }

  // caches[0] as the append path reads it (Python's manifest_check proves more; these are what a
  // wrong value would turn into a crash or an endless loop here)
  void check_kv_spec() const {
    auto bad = [](const std::string& what) { return Error("manifest: caches[0]." + what, 2); };
    if (!kv_spec.is_object()) throw Error("manifest: a cache segment needs a 'caches' entry", 2);
    if (!kv_spec.contains("input") || !kv_spec["input"].is_string() || !cache_seg->axis_in.count(kv_spec["input"]))
      throw bad("input must name a sequence input of the cache segment");
    for (const auto& in : cache_seg->inputs)
      if (in.name == kv_spec["input"] && in.shape.size() < 2) throw bad("input must have a sequence axis (axis 1)");
    const json& k = kv_spec.contains("items_per_position") ? kv_spec["items_per_position"] : json();
    if (!k.is_number_integer() || k.get<int64_t>() < 1 || k.get<int64_t>() > 1 << 20)
      throw bad("items_per_position must be an integer >= 1");
    if (kv_spec.contains("appendable") && !kv_spec["appendable"].is_boolean()) throw bad("appendable must be true or false");
    const json& axes = kv_spec.contains("seq_axis") ? kv_spec["seq_axis"] : json();
    for (const auto& o : cache_seg->outputs) {
      if (!axes.is_object() || !axes.contains(o.name) || !axes[o.name].is_number_unsigned() ||
          axes[o.name].get<uint64_t>() >= o.shape.size())
        throw bad("seq_axis must give an axis of every cache tensor (" + shown(o.name) + ")");
    }
    if (kv_spec.contains("layout") && kv_spec["layout"].is_object())
      for (const auto& t : kv_spec["layout"].items())
        if (t.value().is_object() && t.value().value("positions", json()) == "window" &&
            (!t.value().contains("window") || !t.value()["window"].is_number_unsigned()))
          throw bad("layout[" + shown(t.key()) + "].window must be a count of positions");
  }

  std::map<std::string, Ort::SessionOptions> pending;
  void session_of(Seg& seg, const json& options, const std::string& where) {
    pending.emplace(seg.name, session_options(options, where));
    for (const auto& s : seg.inputs) {
      auto at = std::find(s.shape.begin(), s.shape.end(), "users");
      seg.axis_in[s.name] = at == s.shape.end() ? 0 : static_cast<size_t>(at - s.shape.begin());
    }
    for (const auto& s : seg.outputs) {
      auto at = std::find(s.shape.begin(), s.shape.end(), "users");
      if (at == s.shape.end() && seg.role == "cache")
        throw Error("manifest: segment " + shown(seg.name) + " output " + shown(s.name) + " has no 'users' axis", 2);
      seg.axis_out[s.name] = at == s.shape.end() ? 0 : static_cast<size_t>(at - s.shape.begin());
    }
  }

  void create(Seg& seg, const std::string& model) {
    try {
      seg.session = std::make_unique<Ort::Session>(env(), model.data(), model.size(), pending.at(seg.name));
    } catch (const Ort::Exception& e) {
      std::string first = e.what();
      first = first.substr(0, first.find('\n'));
      if (e.GetOrtErrorCode() == ORT_NOT_IMPLEMENTED)
        throw Error("ONNX Runtime (CPUExecutionProvider) has no kernel for an op of this graph: " + first.substr(0, 240), 3);
      throw Error("ONNX Runtime cannot load " + seg.file + ": " + first.substr(0, 240), 2);
    }
    check_interface(seg, seg.inputs, true);
    check_interface(seg, seg.outputs, false);
    for (const auto& s : seg.inputs) seg.in_names.push_back(s.name.c_str());
    for (const auto& s : seg.outputs) seg.out_names.push_back(s.name.c_str());
  }

  // The manifest's specs must be the file's (mixexport.manifest_check.interface_mismatch): the
  // runtime feeds and cuts tensors by them.
  void check_interface(const Seg& seg, const std::vector<mixbundle::Spec>& specs, bool inputs) {
    Ort::AllocatorWithDefaultOptions alloc;
    size_t n = inputs ? seg.session->GetInputCount() : seg.session->GetOutputCount();
    std::map<std::string, Ort::TypeInfo> found;
    std::vector<std::string> names_file, names_manifest;
    for (size_t k = 0; k < n; ++k) {
      std::string name = (inputs ? seg.session->GetInputNameAllocated(k, alloc) : seg.session->GetOutputNameAllocated(k, alloc)).get();
      names_file.push_back(name);
      found.emplace(name, inputs ? seg.session->GetInputTypeInfo(k) : seg.session->GetOutputTypeInfo(k));
    }
    for (const auto& s : specs) names_manifest.push_back(s.name);
    std::sort(names_file.begin(), names_file.end());
    std::sort(names_manifest.begin(), names_manifest.end());
    std::string what = inputs ? "inputs" : "outputs", problem;
    if (names_file != names_manifest) {
      problem = "its " + what + " are " + pylist(names_manifest) + " in the manifest, " + pylist(names_file) + " in the file";
    } else {
      for (const auto& s : specs) {
        auto info = found.at(s.name).GetTensorTypeAndShapeInfo();
        const DType* d = dtype_of(info.GetElementType());
        std::vector<int64_t> shape = info.GetShape();
        bool bad = !d || s.dtype != d->name || shape.size() != s.shape.size();
        for (size_t a = 0; !bad && a < shape.size(); ++a)
          bad = shape[a] >= 0 && (!is_static(s.shape[a]) || size_of(s.shape[a]) != shape[a]);
        if (bad) {
          problem = what.substr(0, what.size() - 1) + " " + shown(s.name) + " is " + s.dtype + pylist(s.shape, false) +
                    " in the manifest, " + (d ? d->name : "another dtype") + pyints(shape) + " in the file";
          break;
        }
      }
    }
    if (!problem.empty())
      throw Error("segment " + shown(seg.name) + " of the manifest does not describe " + seg.file + ": " + problem, 2);
  }

  // ---- running a segment
  Tensors run(const Seg& seg, const std::map<std::string, const Tensor*>& feeds) const {
    std::vector<const Tensor*> ordered;
    ordered.reserve(seg.inputs.size());
    for (const auto& s : seg.inputs) {
      auto it = feeds.find(s.name);
      ordered.push_back(it == feeds.end() ? nullptr : it->second);
    }
    return run(seg, ordered);
  }

  // `feeds`: one tensor per input of the segment, in seg.inputs' order (null: not given). The
  // tensors are handed to ONNX Runtime in place, without a copy.
  Tensors run(const Seg& seg, const std::vector<const Tensor*>& feeds) const {
    std::vector<Ort::Value> values;
    values.reserve(seg.inputs.size());
    for (size_t k = 0; k < seg.inputs.size(); ++k) {
      if (!feeds[k])
        throw Error("no value for input " + shown(seg.inputs[k].name) + " of segment " + shown(seg.name), 2);
      const Tensor& t = *feeds[k];
      const DType* d = dtype_of(t.dtype);
      if (!d) throw Error("input " + shown(seg.inputs[k].name) + " has dtype " + t.dtype + ", which ONNX Runtime is not given", 2);
      static char empty;  // ORT wants a non-null pointer even for a tensor without elements
      void* data = t.data.empty() ? &empty : const_cast<char*>(t.data.data());  // ORT only reads inputs
      values.push_back(Ort::Value::CreateTensor(mem, data, t.data.size(), t.shape.data(), t.shape.size(), d->onnx));
    }
    std::vector<Ort::Value> outs;
    try {
      outs = seg.session->Run(Ort::RunOptions{nullptr}, seg.in_names.data(), values.data(), values.size(),
                              seg.out_names.data(), seg.out_names.size());
    } catch (const Ort::Exception& e) {
      std::string first = e.what();
      throw Error("segment " + shown(seg.name) + " failed in ONNX Runtime: " + first.substr(0, first.find('\n')), 2);
    }
    Tensors result;
    for (size_t k = 0; k < outs.size(); ++k) {
      auto info = outs[k].GetTensorTypeAndShapeInfo();
      const DType* d = dtype_of(info.GetElementType());
      if (!d) throw Error("segment " + shown(seg.name) + " returned a tensor type this scorer cannot read", 2);
      Tensor t{d->name, info.GetShape(), {}, d->size};
      t.data.resize(static_cast<size_t>(t.numel()) * d->size);
      if (!t.data.empty()) std::memcpy(t.data.data(), outs[k].GetTensorRawData(), t.data.size());
      result.emplace(seg.out_names[k], std::move(t));
    }
    return result;
  }

  // ---- the request path (mixexport.runtime.Runtime.score)
  Tensors score(const Request& r) {
    if (full) {  // user rows gathered to one per candidate; item inputs as they are
      std::vector<int64_t> idx = indices(r.user_index);
      std::vector<Tensor> rows;
      rows.reserve(full->inputs.size());  // no reallocation: feeds point into it
      std::vector<const Tensor*> feeds;
      for (const auto& s : full->inputs) {
        auto item = r.item.find(s.name), user = r.user.find(s.name);
        if (item != r.item.end()) {
          feeds.push_back(&item->second);
        } else if (user != r.user.end()) {
          rows.push_back(take(user->second, 0, idx));
          feeds.push_back(&rows.back());
        } else {
          feeds.push_back(nullptr);
        }
      }
      return run(*full, feeds);
    }
    // the K/V and the user state are fed to the item segment in place: for one user they are that
    // user's cache entries themselves (immutable, and held here: an eviction meanwhile frees nothing)
    Entry kv_values, state;
    if (cache_seg) kv_values = sequence_cache(r);
    if (user_seg) state = user_state(r, kv_values.get());
    std::map<std::string, const Tensor*> feeds;
    for (const auto& kv : r.item) feeds[kv.first] = &kv.second;
    for (const Entry& e : {kv_values, state})
      if (e)
        for (const auto& kv : *e) feeds[kv.first] = &kv.second;  // "rows/..." keys name no input
    feeds["user_index"] = &r.user_index;
    return run(*item_seg, feeds);
  }

  static std::vector<int64_t> indices(const Tensor& t) {
    const auto* p = reinterpret_cast<const int64_t*>(t.data.data());
    return std::vector<int64_t>(p, p + t.numel());
  }

  // Cache key of user row `u`: the id and a digest of that user's input rows, names in sorted order
  // (Python: (uid, blake2b(name + row bytes ...)); the digest function differs, the key's content not).
  static std::string user_key(const Request& r, size_t u) {
    mixsha::Sha256 h;
    for (const auto& kv : r.user) {  // std::map: sorted by name, like Python's sorted(user)
      h.update(kv.first.data(), kv.first.size());
      size_t row = kv.second.data.size() / static_cast<size_t>(std::max<int64_t>(kv.second.shape[0], 1));
      h.update(kv.second.data.data() + u * row, row);
    }
    return std::string(reinterpret_cast<const char*>(&r.user_ids[u]), 8) + h.raw();
  }

  // The users' entries joined along each tensor's users axis; one user's entry is already that
  // (no copy: a user-state hit for one user costs a lookup, not a copy of the state).
  static Entry concat_users(const std::vector<Entry>& per_user, const std::map<std::string, size_t>& axes) {
    if (per_user.size() == 1) return per_user[0];
    auto out = std::make_shared<Tensors>();
    for (const auto& kv : *per_user[0]) {
      if (kv.first.rfind("rows/", 0) == 0) continue;
      std::vector<const Tensor*> parts;
      for (const auto& e : per_user) parts.push_back(&e->at(kv.first));
      out->emplace(kv.first, concat(parts, axes.at(kv.first)));
    }
    return out;
  }

  // One entry per user row j of `fresh` (a segment's outputs for those users, in that order).
  static std::vector<std::shared_ptr<Tensors>> split_users(Tensors&& fresh, size_t users,
                                                           const std::map<std::string, size_t>& axes) {
    std::vector<std::shared_ptr<Tensors>> out;
    if (users == 1) {  // the outputs are that user's rows already
      out.push_back(std::make_shared<Tensors>(std::move(fresh)));
      return out;
    }
    for (size_t j = 0; j < users; ++j) {
      auto entry = std::make_shared<Tensors>();
      for (const auto& kv : fresh) entry->emplace(kv.first, take(kv.second, axes.at(kv.first), {static_cast<int64_t>(j)}));
      out.push_back(entry);
    }
    return out;
  }

  // mixexport.runtime.Runtime.user_state
  Entry user_state(const Request& r, const Tensors* extra) {
    const Seg& seg = *user_seg;
    std::map<std::string, const Tensor*> per_user;
    for (const auto& kv : r.user) per_user[kv.first] = &kv.second;
    if (extra)
      for (const auto& kv : *extra)
        if (seg.axis_in.count(kv.first)) per_user[kv.first] = &kv.second;
    if (!r.has_user_ids) return std::make_shared<Tensors>(run(seg, per_user));
    size_t users = r.user_ids.size();
    std::vector<std::string> keys;
    std::vector<Entry> cached;
    std::vector<int64_t> missing;
    for (size_t u = 0; u < users; ++u) {
      keys.push_back(user_key(r, u));
      cached.push_back(cache.get(keys.back()));
      if (!cached.back()) missing.push_back(static_cast<int64_t>(u));
    }
    if (!missing.empty()) {
      Tensors rows;
      std::map<std::string, const Tensor*> feeds;
      for (const auto& s : seg.inputs) rows.emplace(s.name, take(*per_user.at(s.name), seg.axis_in.at(s.name), missing));
      for (const auto& kv : rows) feeds[kv.first] = &kv.second;
      auto entries = split_users(run(seg, feeds), missing.size(), seg.axis_out);
      for (size_t j = 0; j < missing.size(); ++j) {
        cache.put(keys[static_cast<size_t>(missing[j])], entries[j]);
        cached[static_cast<size_t>(missing[j])] = entries[j];
      }
    }
    return concat_users(cached, seg.axis_out);
  }

  // mixexport.runtime.Runtime.sequence_cache: hit, append or rebuild per user id.
  Entry sequence_cache(const Request& r) {
    const Seg& seg = *cache_seg;
    std::map<std::string, const Tensor*> all;
    for (const auto& s : seg.inputs) all[s.name] = &r.user.at(s.name);
    if (!r.has_user_ids) return std::make_shared<Tensors>(run(seg, all));
    std::vector<Entry> per_user(r.user_ids.size());
    std::vector<int64_t> misses;
    for (size_t u = 0; u < r.user_ids.size(); ++u) {
      Tensors rows;
      for (const auto& s : seg.inputs) rows.emplace(s.name, take(r.user.at(s.name), 0, {static_cast<int64_t>(u)}));
      std::string key(reinterpret_cast<const char*>(&r.user_ids[u]), 8);
      Entry entry = kv.get(key), got;
      int64_t KvStats::*kind = nullptr;
      if (entry) {
        bool hit = true;
        for (const auto& s : seg.inputs) hit = hit && same(entry->at("rows/" + s.name), rows.at(s.name));
        if (hit) {
          got = entry;  // the same rows: the entry as it is (put again below: most recently used)
          kind = &KvStats::hits;
        } else if (kv_spec.value("appendable", false)) {
          if (auto appended = append(*entry, rows)) {
            for (auto& kvr : rows) (*appended)["rows/" + kvr.first] = std::move(kvr.second);
            got = appended;
            kind = &KvStats::appends;
          }
        }
      }
      if (!got) {
        misses.push_back(static_cast<int64_t>(u));
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(kv_mu);
        ++(kv_counts.*kind);
      }
      kv.put(key, got);
      per_user[u] = got;
    }
    if (!misses.empty()) {
      Tensors rows;
      std::map<std::string, const Tensor*> feeds;
      for (const auto& s : seg.inputs) rows.emplace(s.name, take(r.user.at(s.name), 0, misses));
      for (const auto& kvr : rows) feeds[kvr.first] = &kvr.second;
      auto entries = split_users(run(seg, feeds), misses.size(), seg.axis_out);
      for (size_t j = 0; j < misses.size(); ++j) {
        auto u = static_cast<size_t>(misses[j]);
        auto& got = entries[j];
        for (const auto& s : seg.inputs) (*got)["rows/" + s.name] = take(r.user.at(s.name), 0, {misses[j]});
        kv.put(std::string(reinterpret_cast<const char*>(&r.user_ids[u]), 8), got);
        per_user[u] = got;
      }
      std::lock_guard<std::mutex> lock(kv_mu);
      kv_counts.misses += static_cast<int64_t>(misses.size());
    }
    return concat_users(per_user, seg.axis_out);
  }

  // mixexport.runtime.Runtime._append: the new rows are the old ones slid left by m items with m
  // new ones at the end; only the new positions (plus context) run, the oldest are dropped.
  std::shared_ptr<Tensors> append(const Tensors& entry, const Tensors& rows) {
    const Seg& seg = *cache_seg;
    std::string seq = kv_spec.at("input").get<std::string>();
    int64_t k = kv_spec.at("items_per_position").get<int64_t>();
    for (const auto& s : seg.inputs)
      if (s.name != seq && !same(entry.at("rows/" + s.name), rows.at(s.name))) return nullptr;
    const Tensor& old_seq = entry.at("rows/" + seq);
    const Tensor& new_seq = rows.at(seq);
    int64_t s_old = old_seq.shape[1], s_new = new_seq.shape[1];
    size_t item = static_cast<size_t>(prod(new_seq.shape, 2, new_seq.shape.size())) * new_seq.itemsize;
    std::set<std::string> windows;
    int64_t widest = 2;
    const json layout = kv_spec.contains("layout") && kv_spec["layout"].is_object() ? kv_spec["layout"] : json::object();
    for (const auto& t : layout.items())
      if (t.value().is_object() && t.value().value("positions", json()) == "window") {
        windows.insert(t.key());
        widest = std::max<int64_t>(widest, t.value().at("window").get<int64_t>());
      }
    int64_t need = 0;
    if (!windows.empty()) {
      need = widest * k;
      auto lo = minimums.find("seq");
      if (lo != minimums.end()) need = std::max(need, lo->second);
    }
    for (int64_t m = k; m < s_new; m += k) {
      int64_t keep = s_new - m;
      if (keep > s_old || (s_old - keep) % k != 0) continue;
      if (std::memcmp(new_seq.data.data(), old_seq.data.data() + static_cast<size_t>(s_old - keep) * item,
                      static_cast<size_t>(keep) * item) != 0)
        continue;
      // one kept position is computed beside the new one (an exported program takes no size-1 axis)
      int64_t ctx = m == k ? k : 0;
      if (m + ctx < need) ctx = (need - m + k - 1) / k * k;
      if (ctx > keep) return nullptr;  // the window reaches back past what is kept: a rebuild
      Tensor tail = slice(new_seq, 1, keep - ctx, s_new);
      std::map<std::string, const Tensor*> feeds;
      for (const auto& kvr : rows) feeds[kvr.first] = &kvr.second;
      feeds[seq] = &tail;
      Tensors fresh = run(seg, feeds);
      int64_t drop = (s_old - keep) / k;
      auto out = std::make_shared<Tensors>();
      for (auto& t : fresh) {
        if (windows.count(t.first)) {
          out->emplace(t.first, std::move(t.second));
          continue;
        }
        auto axis = static_cast<size_t>(kv_spec.at("seq_axis").at(t.first).get<int64_t>());
        const Tensor& before = entry.at(t.first);
        Tensor kept = slice(before, axis, drop, before.shape[axis]);
        Tensor added = slice(t.second, axis, ctx / k, t.second.shape[axis]);
        out->emplace(t.first, concat({&kept, &added}, axis));
      }
      return out;
    }
    return nullptr;
  }

  // ---- request checks (mixexport.runtime.Runtime.check, mixexport.specs.check_feeds)
  // A request that passes costs one pass over its values and no string building: the messages
  // (and the sorted name lists) are made only on the way to a refusal.
  std::map<std::string, int64_t> check_feeds(const std::vector<InputSpec>& specs, const Tensors& feeds,
                                             const std::string& what) const {
    bool names_match = feeds.size() == specs.size();  // spec names are unique: all found = no extra
    for (size_t k = 0; names_match && k < specs.size(); ++k) names_match = feeds.count(specs[k].spec.name) > 0;
    if (!names_match) {
      std::vector<std::string> missing, extra;
      std::set<std::string> names;
      for (const auto& s : specs) {
        names.insert(s.spec.name);
        if (!feeds.count(s.spec.name)) missing.push_back(s.spec.name);
      }
      for (const auto& kv : feeds)
        if (!names.count(kv.first)) extra.push_back(kv.first);
      std::sort(missing.begin(), missing.end());
      throw Error(what + "s do not match: missing " + pylist(missing) + ", unexpected " + pylist(extra), 2);
    }
    std::map<std::string, int64_t> bound;
    for (const auto& is : specs) {
      const auto& s = is.spec;
      const Tensor& a = feeds.find(s.name)->second;
      auto head = [&] { return what + " " + shown(s.name); };
      if (a.dtype != s.dtype) throw Error(head() + ": expected dtype " + s.dtype + ", found " + a.dtype, 2);
      if (a.shape.size() != s.shape.size())
        throw Error(head() + ": expected rank " + std::to_string(s.shape.size()) + " " + pylist(s.shape, false) +
                    ", found shape " + pyints(a.shape), 2);
      for (size_t ax = 0; ax < s.shape.size(); ++ax) {
        const std::string& want = s.shape[ax];
        if (is.sizes[ax] == kSymbolic) {
          auto it = bound.emplace(want, a.shape[ax]).first;
          if (it->second != a.shape[ax])
            throw Error(head() + ": axis " + std::to_string(ax) + " (" + want + ") is " + std::to_string(a.shape[ax]) +
                        ", but other inputs have " + want + " = " + std::to_string(it->second), 2);
        } else if (is.sizes[ax] != a.shape[ax]) {
          throw Error(head() + ": axis " + std::to_string(ax) + " must be " + want + ", found " + std::to_string(a.shape[ax]), 2);
        }
      }
      int64_t bad = first_nonfinite(a);
      if (bad >= 0) throw Error(head() + " holds NaN/Inf (first at index " + pyints(unravel(bad, a.shape)) + ")", 2);
      if (!is.ids.empty()) check_ids(a, is.ids, head);
    }
    return bound;
  }

  // negative, past the table, past the column's slice: refused, never wrapped (one typed scan; the
  // refusal's message is mixids::check's)
  template <class Head>
  static void check_ids(const Tensor& a, const std::vector<mixids::Range>& ids, const Head& head) {
    auto scan = [&](auto at) {
      if (mixids::in_range(a.shape, a.numel(), ids, at)) return;
      try {
        mixids::check(head(), a.shape, a.numel(), ids, at);
      } catch (const mixids::BadRequest& e) {
        throw Error(e.what(), 2);
      }
    };
    auto of = [](const auto* v) { return [v](int64_t i) { return static_cast<int64_t>(v[i]); }; };
    const char* p = a.data.data();
    if (a.dtype == "int64") scan(of(reinterpret_cast<const int64_t*>(p)));
    else if (a.dtype == "int32") scan(of(reinterpret_cast<const int32_t*>(p)));
    else if (a.dtype == "int16") scan(of(reinterpret_cast<const int16_t*>(p)));
    else if (a.dtype == "int8") scan(of(reinterpret_cast<const int8_t*>(p)));
    else if (a.dtype == "uint8" || a.dtype == "bool") scan(of(reinterpret_cast<const uint8_t*>(p)));
    else scan([](int64_t) { return int64_t{0}; });  // no ids in other dtypes (the manifest gives them none)
  }

  // Index (C order) of the first NaN/Inf, or -1 (always -1 for integer dtypes).
  static int64_t first_nonfinite(const Tensor& a) {
    const int64_t n = a.numel();
    const char* p = a.data.data();
    auto first = [n](auto* v, auto finite) {
      for (int64_t i = 0; i < n; ++i)
        if (!finite(v[i])) return i;
      return int64_t{-1};
    };
    if (a.dtype == "float32") return first(reinterpret_cast<const float*>(p), [](float x) { return std::isfinite(x); });
    if (a.dtype == "float64") return first(reinterpret_cast<const double*>(p), [](double x) { return std::isfinite(x); });
    if (a.dtype == "float16")
      return first(reinterpret_cast<const uint16_t*>(p), [](uint16_t x) { return (x & 0x7c00) != 0x7c00; });
    if (a.dtype == "bfloat16")
      return first(reinterpret_cast<const uint16_t*>(p), [](uint16_t x) { return (x & 0x7f80) != 0x7f80; });
    return -1;
  }

  void check(const Request& r) const {
    auto bound = check_feeds(user_specs, r.user, "user input");
    for (const auto& mk : multiples) {
      auto it = bound.find(mk.first);
      const std::string& base = mk.second.first;
      int64_t k = mk.second.second;
      if (it != bound.end() && k && it->second % k)
        throw Error("the " + mk.first + " axis is " + std::to_string(it->second) + ", expected a multiple of " +
                    std::to_string(k) + " (" + std::to_string(k) + " items per " +
                    (base.size() && base.back() == 's' ? base.substr(0, base.size() - 1) : base) + ")", 2);
    }
    for (const auto& lo : minimums) {
      std::string name = lo.first;
      int64_t k = 1;
      for (const auto& mk : multiples)
        if (mk.second.first == lo.first) name = mk.first, k = mk.second.second;
      auto it = bound.find(name);
      if (it != bound.end() && it->second < lo.second * k)
        throw Error("the " + name + " axis is " + std::to_string(it->second) + ", expected at least " +
                    std::to_string(lo.second * k) +
                    (k > 1 ? " (" + std::to_string(lo.second) + " " + lo.first + " of " + std::to_string(k) + " items)" : ""), 2);
    }
    auto items = check_feeds(item_specs, r.item, "item input");
    for (const auto& hi : maximums) {  // as the Python runtime: an item axis names over a user one
      auto it = items.find(hi.first);
      int64_t found = it != items.end() ? it->second : bound.count(hi.first) ? bound[hi.first] : -1;
      if (found > hi.second)
        throw Error("the " + hi.first + " axis is " + std::to_string(found) + ", the model takes at most " +
                    std::to_string(hi.second), 2);
    }
    const Tensor& idx = r.user_index;
    if (idx.dtype != "int64" || idx.shape.size() != 1) throw Error("user_index must be an int64 vector [N]", 2);
    if (items.count("batch") && idx.shape[0] != items["batch"])
      throw Error("user_index has " + std::to_string(idx.shape[0]) + " entries, the item inputs have " +
                  std::to_string(items["batch"]) + " rows", 2);
    if (bound.count("batch") && idx.numel()) {
      const auto* v = reinterpret_cast<const int64_t*>(idx.data.data());
      auto [lo, hi] = std::minmax_element(v, v + idx.numel());
      if (*lo < 0 || *hi >= bound["batch"])
        throw Error("user_index values must be in [0, " + std::to_string(bound["batch"]) + "), found " +
                    std::to_string(*lo) + ".." + std::to_string(*hi), 2);
    }
    if (r.has_user_ids && bound.count("batch") && static_cast<int64_t>(r.user_ids.size()) != bound["batch"])
      throw Error("user_ids has " + std::to_string(r.user_ids.size()) + " entries for " + std::to_string(bound["batch"]) + " users", 2);
  }
};

Scorer::Scorer(const std::string& bundle_dir, const Options& options) {
  init_runtime();
  try {
    impl_ = std::make_unique<Impl>(bundle_dir, options);
  } catch (const Ort::Exception& e) {
    throw Error(std::string("ONNX Runtime: ") + e.what(), 3);
  }
}
Scorer::~Scorer() = default;

void Scorer::check(const Request& request) const { impl_->check(request); }
Tensors Scorer::score(const Request& request, bool validate) {
  if (validate) impl_->check(request);
  return impl_->score(request);
}
const std::vector<std::string>& Scorer::output_names() const { return impl_->outputs; }
bool Scorer::is_user_side(const std::string& input) const {
  for (const auto& s : impl_->user_specs)
    if (s.spec.name == input) return true;
  return false;
}
std::vector<std::string> Scorer::input_names() const {
  std::vector<std::string> out;
  for (const auto& s : impl_->bundle.inputs) out.push_back(s.name);
  return out;
}
CacheStats Scorer::user_cache_stats() const { return impl_->cache.stats(); }
CacheStats Scorer::kv_cache_stats() const { return impl_->kv.stats(); }
KvStats Scorer::kv_stats() const {
  std::lock_guard<std::mutex> lock(impl_->kv_mu);
  return impl_->kv_counts;
}
std::string Scorer::describe() const {
  std::string layout;
  for (const auto& s : impl_->segs) layout += (layout.empty() ? "" : "+") + s.role;
  return "layout " + layout + ", " + std::to_string(impl_->segs.size()) + " segment(s)";
}

Request read_request(const Scorer& scorer, const std::string& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw Error("request directory " + dir + " does not exist", 2);
  Request r;
  auto read = [&](const fs::path& p) {
    try {
      return mixnpy::read(p.string());
    } catch (const std::exception& e) {
      throw Error(std::string(e.what()), 2);
    }
  };
  bool has_index = false;
  for (const auto& f : fs::directory_iterator(dir)) {
    if (f.path().extension() != ".npy") continue;
    std::string name = f.path().stem().string();
    if (name == "user_index") {
      r.user_index = read(f.path());
      has_index = true;
    } else if (name == "user_ids") {
      Tensor ids = read(f.path());
      if (ids.dtype != "int64" || ids.shape.size() != 1)
        throw Error("user_ids.npy must be an int64 vector [U], found " + ids.dtype + " " + pyints(ids.shape), 2);
      const auto* p = reinterpret_cast<const int64_t*>(ids.data.data());
      r.user_ids.assign(p, p + ids.numel());
      r.has_user_ids = true;
    } else {
      auto inputs = scorer.input_names();
      bool known = std::find(inputs.begin(), inputs.end(), name) != inputs.end();
      // a file naming no input is kept with the user inputs, where check() reports it as unexpected
      (known && !scorer.is_user_side(name) ? r.item : r.user)[name] = read(f.path());
    }
  }
  if (!has_index) throw Error("request directory " + dir + " has no user_index.npy (int64 [N])", 2);
  return r;
}

}  // namespace mixort
