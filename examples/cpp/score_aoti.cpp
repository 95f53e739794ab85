// The core of a C++ scoring server for a mixexport AOTI bundle (`mixexport build --target aoti`).
//
//   mixexport_score_aoti BUNDLE_DIR REQUEST_DIR [--device cpu|cuda] [--repeat K] [--manifest-sha256 HEX]
//
// Reads BUNDLE_DIR/manifest.json (every path it names must stay inside the bundle), checks every
// segment's AOTInductor package against its sha256 in the manifest, then loads them with libtorch's
// torch::inductor::AOTIModelPackageLoader, reads the request (a directory of .npy files, see
// bundle.hpp), and runs the segment DAG the Python runtime runs:
//   - one `full` segment: user-side inputs gathered to one row per candidate by user_index;
//   - `user` + `item` segments: the user segment once per user, then the item segment for the N
//     candidates with the user state (leading dim U), the item inputs and user_index.
// Prints every model output, one line per candidate (values with 9 significant digits, enough to
// round-trip float32). With --repeat K, also times K scoring calls and prints the mean on stderr.
// With --manifest-sha256 HEX, a manifest.json whose sha256 differs is refused before it is read.
#include <ATen/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bundle.hpp"

namespace {

using TensorMap = std::map<std::string, at::Tensor>;

c10::ScalarType scalar_type(const std::string& dtype) {
  if (dtype == "float32") return c10::kFloat;
  if (dtype == "float16") return c10::kHalf;
  if (dtype == "bfloat16") return c10::kBFloat16;
  if (dtype == "float64") return c10::kDouble;
  if (dtype == "int64") return c10::kLong;
  if (dtype == "int32") return c10::kInt;
  if (dtype == "int8") return c10::kChar;
  if (dtype == "uint8") return c10::kByte;
  if (dtype == "bool") return c10::kBool;
  throw std::runtime_error("unsupported dtype " + dtype);
}

at::Tensor to_tensor(const mixnpy::Array& a) {
  at::Tensor t = at::empty(a.shape, at::TensorOptions().dtype(scalar_type(a.dtype)));
  std::memcpy(t.data_ptr(), a.data.data(), a.data.size());
  return t;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

// One loaded segment: the package plus its flat input/output order (package metadata written by
// mixexport's AOTI backend).
struct LoadedSegment {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::vector<std::string> inputs, outputs;
};

// `path` was verified (path rule, sha256) by mixbundle::verified_engines: a package is native code.
LoadedSegment load_segment(const std::string& path, const mixbundle::Segment& seg) {
  LoadedSegment out;
  out.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
  auto meta = out.loader->get_metadata();
  out.inputs = split(meta["mixexport.inputs"]);
  out.outputs = split(meta["mixexport.outputs"]);
  if (out.inputs.size() != seg.inputs.size() || out.outputs.size() != seg.outputs.size())
    throw std::runtime_error(seg.engines.at("aoti") + " does not match segment " + seg.name + " of the manifest");
  return out;
}

TensorMap run(LoadedSegment& seg, const TensorMap& feeds, const c10::Device& device) {
  std::vector<at::Tensor> args;
  for (const auto& name : seg.inputs) {
    auto it = feeds.find(name);
    if (it == feeds.end()) throw std::runtime_error("no value for segment input " + name);
    args.push_back(it->second.to(device).contiguous());
  }
  std::vector<at::Tensor> outs = seg.loader->run(args);
  TensorMap result;
  for (size_t k = 0; k < seg.outputs.size(); ++k) result[seg.outputs[k]] = outs.at(k);
  return result;
}

struct Scorer {
  const mixbundle::Bundle& bundle;
  c10::Device device;
  std::map<std::string, LoadedSegment> loaded;

  Scorer(const mixbundle::Bundle& b, c10::Device d) : bundle(b), device(d) {
    if (b.find("cache"))  // the KV-cache path runs in mixexport_score_ort (mixexport_ort.cpp), not here
      throw std::runtime_error("bundle has a cache segment (KV cache), which mixexport_score_aoti does not run: "
                               "serve it with mixexport_score_ort or the Python runtime");
    std::map<std::string, std::string> paths = mixbundle::verified_engines(b, "aoti");  // all, before any load
    for (const auto& seg : b.segments) loaded.emplace(seg.name, load_segment(paths.at(seg.name), seg));
  }

  TensorMap score(const TensorMap& user, const TensorMap& item, const at::Tensor& user_index) {
    if (const auto* full = bundle.find("full")) {
      TensorMap feeds = item;
      for (const auto& kv : user) feeds[kv.first] = kv.second.index_select(0, user_index);
      return run(loaded.at(full->name), feeds, device);
    }
    const auto* user_seg = bundle.find("user");
    const auto* item_seg = bundle.find("item");
    TensorMap user_feeds;
    for (const auto& kv : user)
      if (user_seg->has_input(kv.first)) user_feeds[kv.first] = kv.second;
    TensorMap state = run(loaded.at(user_seg->name), user_feeds, device);  // once per user
    TensorMap feeds;
    for (const auto& kv : state)
      if (item_seg->has_input(kv.first)) feeds[kv.first] = kv.second;  // stays on the device
    for (const auto& kv : item) feeds[kv.first] = kv.second;
    if (item_seg->has_input("user_index")) feeds["user_index"] = user_index;
    return run(loaded.at(item_seg->name), feeds, device);
  }
};

void print_outputs(const mixbundle::Bundle& b, const TensorMap& outs) {
  for (const auto& spec : b.outputs) {
    at::Tensor t = outs.at(spec.name).to(c10::kCPU).to(c10::kFloat).contiguous();
    int64_t rows = t.dim() ? t.size(0) : 1;
    int64_t cols = rows ? t.numel() / rows : 0;
    std::printf("output %s", spec.name.c_str());
    for (int64_t d : t.sizes()) std::printf(" %lld", static_cast<long long>(d));
    std::printf("\n");
    const float* p = t.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) std::printf(c ? " %.9g" : "%.9g", p[r * cols + c]);
      std::printf("\n");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0]
              << " BUNDLE_DIR REQUEST_DIR [--device cpu|cuda] [--repeat K] [--manifest-sha256 HEX]\n";
    return 2;
  }
  std::string device_name = "cpu", pinned;
  int repeat = 0;
  for (int k = 3; k + 1 < argc; k += 2) {
    std::string flag = argv[k];
    if (flag == "--device") device_name = argv[k + 1];
    else if (flag == "--repeat") repeat = std::stoi(argv[k + 1]);
    else if (flag == "--manifest-sha256") pinned = argv[k + 1];
    else {
      std::cerr << "unknown option " << flag << "\n";
      return 2;
    }
  }
  try {
    mixbundle::Bundle bundle = mixbundle::load(argv[1], pinned);
    mixbundle::Request req = mixbundle::load_request(bundle, argv[2]);
    c10::Device device(device_name);
    TensorMap user, item;
    for (const auto& kv : req.user) user[kv.first] = to_tensor(kv.second);
    for (const auto& kv : req.item) item[kv.first] = to_tensor(kv.second);
    at::Tensor user_index = to_tensor(req.user_index);
    if (device.is_cuda()) {  // move the request once; index_select then runs on the GPU
      for (auto& kv : user) kv.second = kv.second.to(device);
      for (auto& kv : item) kv.second = kv.second.to(device);
      user_index = user_index.to(device);
    }
    Scorer scorer(bundle, device);
    TensorMap outs = scorer.score(user, item, user_index);
    print_outputs(bundle, outs);
    if (repeat > 0) {
      auto t0 = std::chrono::steady_clock::now();
      for (int k = 0; k < repeat; ++k) outs = scorer.score(user, item, user_index);
      (void)outs.begin()->second.to(c10::kCPU);  // wait for the device
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::cerr << "mean over " << repeat << " calls: " << ms / repeat << " ms (" << req.users << " user(s) x "
                << req.candidates << " candidates)\n";
    }
  } catch (const mixids::BadRequest& e) {  // the request's fault (an id outside its range): usage error
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
