// TensorRT loader for mixexport bundles built with `--target trt` (engines/<segment>.tensorrt.<sm>.plan).
//
//   mixexport_score_trt BUNDLE_DIR REQUEST_DIR [--backend tensorrt|tensorrt-rtx]
//
// Same request format and segment DAG as score_aoti.cpp, with TensorRT 10's name-based I/O
// (setInputShape / setTensorAddress / enqueueV3) and cudaMalloc'd buffers; user state stays on
// the GPU between the user and the item engine.
//
// NOT VERIFIED: this project's CI machines have neither TensorRT nor a GPU, so this file is built
// only when CMake finds TensorRT and has never been compiled or run by the project's tests.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bundle.hpp"

namespace {

using nvinfer1::DataType;

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

size_t type_size(DataType t) {
  switch (t) {
    case DataType::kFLOAT: case DataType::kINT32: return 4;
    case DataType::kHALF: case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    case DataType::kBOOL: case DataType::kINT8: case DataType::kUINT8: return 1;
    default: throw std::runtime_error("unsupported TensorRT I/O type");
  }
}

// A GPU buffer with its shape and TensorRT type; owns the memory.
struct DeviceTensor {
  void* ptr = nullptr;
  std::vector<int64_t> shape;
  DataType type = DataType::kFLOAT;

  DeviceTensor() = default;
  DeviceTensor(std::vector<int64_t> s, DataType t) : shape(std::move(s)), type(t) {
    size_t n = bytes();
    if (n) check(cudaMalloc(&ptr, n), "cudaMalloc");
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  DeviceTensor(DeviceTensor&& o) noexcept : ptr(o.ptr), shape(std::move(o.shape)), type(o.type) { o.ptr = nullptr; }
  DeviceTensor& operator=(DeviceTensor&& o) noexcept {
    std::swap(ptr, o.ptr);
    shape = std::move(o.shape);
    type = o.type;
    return *this;
  }
  ~DeviceTensor() { if (ptr) cudaFree(ptr); }

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t bytes() const { return static_cast<size_t>(numel()) * type_size(type); }
};

// Host array -> device buffer of the engine's type. The bundle interface is float32/int64; an
// engine may take int64 ids as int32, so that narrowing (range-checked) is the one conversion.
DeviceTensor upload(const mixnpy::Array& a, DataType want, const std::string& name) {
  DeviceTensor t(a.shape, want);
  std::vector<char> host;
  if ((a.dtype == "float32" && want == DataType::kFLOAT) || (a.dtype == "int64" && want == DataType::kINT64) ||
      (a.dtype == "int32" && want == DataType::kINT32) || (a.dtype == "bool" && want == DataType::kBOOL)) {
    host = a.data;
  } else if (a.dtype == "int64" && want == DataType::kINT32) {
    host.resize(static_cast<size_t>(a.numel()) * 4);
    const auto* src = reinterpret_cast<const int64_t*>(a.data.data());
    auto* dst = reinterpret_cast<int32_t*>(host.data());
    for (int64_t i = 0; i < a.numel(); ++i) {
      if (src[i] < INT32_MIN || src[i] > INT32_MAX) throw std::runtime_error(name + ": id does not fit int32");
      dst[i] = static_cast<int32_t>(src[i]);
    }
  } else {
    throw std::runtime_error(name + ": engine input type does not match the array's " + a.dtype);
  }
  if (!host.empty()) check(cudaMemcpy(t.ptr, host.data(), host.size(), cudaMemcpyHostToDevice), "upload");
  return t;
}

struct Engine {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  std::vector<std::string> inputs, outputs;
};

Engine load_engine(nvinfer1::IRuntime& runtime, const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::vector<char> plan((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  Engine e;
  e.engine.reset(runtime.deserializeCudaEngine(plan.data(), plan.size()));
  if (!e.engine) throw std::runtime_error("cannot deserialize " + path + " (other GPU or TensorRT version?)");
  e.context.reset(e.engine->createExecutionContext());
  for (int32_t i = 0; i < e.engine->getNbIOTensors(); ++i) {
    std::string name = e.engine->getIOTensorName(i);
    (e.engine->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT ? e.inputs : e.outputs).push_back(name);
  }
  return e;
}

std::map<std::string, DeviceTensor> run(Engine& e, const std::map<std::string, const DeviceTensor*>& feeds,
                                        cudaStream_t stream) {
  for (const auto& name : e.inputs) {
    auto it = feeds.find(name);
    if (it == feeds.end()) throw std::runtime_error("no value for engine input " + name);
    const DeviceTensor& t = *it->second;
    if (t.type != e.engine->getTensorDataType(name.c_str())) throw std::runtime_error(name + ": type mismatch");
    nvinfer1::Dims dims;
    dims.nbDims = static_cast<int32_t>(t.shape.size());
    for (size_t k = 0; k < t.shape.size(); ++k) dims.d[k] = t.shape[k];
    if (!e.context->setInputShape(name.c_str(), dims)) throw std::runtime_error(name + ": shape outside the profile");
    e.context->setTensorAddress(name.c_str(), t.ptr);
  }
  std::map<std::string, DeviceTensor> outs;
  for (const auto& name : e.outputs) {
    nvinfer1::Dims dims = e.context->getTensorShape(name.c_str());
    std::vector<int64_t> shape(dims.d, dims.d + dims.nbDims);
    DeviceTensor t(shape, e.engine->getTensorDataType(name.c_str()));
    e.context->setTensorAddress(name.c_str(), t.ptr);
    outs.emplace(name, std::move(t));
  }
  if (!e.context->enqueueV3(stream)) throw std::runtime_error("enqueueV3 failed");
  check(cudaStreamSynchronize(stream), "synchronize");
  return outs;
}

float to_float(const char* p, DataType t) {
  uint32_t bits = 0;
  float f = 0.f;
  switch (t) {
    case DataType::kFLOAT: std::memcpy(&f, p, 4); return f;
    case DataType::kBF16: bits = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16;
      std::memcpy(&f, &bits, 4); return f;
    case DataType::kHALF: {
      uint16_t h = *reinterpret_cast<const uint16_t*>(p);
      uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
      float v = exp == 0 ? std::ldexp(static_cast<float>(man), -24)
                         : exp == 31 ? (man ? NAN : INFINITY) : std::ldexp(static_cast<float>(man | 0x400), exp - 25);
      return sign ? -v : v;
    }
    case DataType::kINT32: return static_cast<float>(*reinterpret_cast<const int32_t*>(p));
    case DataType::kINT64: return static_cast<float>(*reinterpret_cast<const int64_t*>(p));
    default: throw std::runtime_error("cannot print this output type");
  }
}

void print_output(const std::string& name, const DeviceTensor& t) {
  std::vector<char> host(t.bytes());
  if (!host.empty()) check(cudaMemcpy(host.data(), t.ptr, host.size(), cudaMemcpyDeviceToHost), "download");
  int64_t rows = t.shape.empty() ? 1 : t.shape[0];
  int64_t cols = rows ? t.numel() / rows : 0;
  size_t size = type_size(t.type);
  std::printf("output %s", name.c_str());
  for (int64_t d : t.shape) std::printf(" %lld", static_cast<long long>(d));
  std::printf("\n");
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c)
      std::printf(c ? " %.9g" : "%.9g", to_float(host.data() + (r * cols + c) * size, t.type));
    std::printf("\n");
  }
}

// User rows gathered to one row per candidate on the host (the `full` segment's flat rows).
mixnpy::Array gather_rows(const mixnpy::Array& a, const mixnpy::Array& user_index) {
  mixnpy::Array out = a;
  const auto* idx = reinterpret_cast<const int64_t*>(user_index.data.data());
  int64_t n = user_index.shape[0];
  size_t row = a.shape[0] ? a.data.size() / static_cast<size_t>(a.shape[0]) : 0;
  out.shape[0] = n;
  out.data.assign(static_cast<size_t>(n) * row, 0);
  for (int64_t i = 0; i < n; ++i) std::memcpy(out.data.data() + i * row, a.data.data() + idx[i] * row, row);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " BUNDLE_DIR REQUEST_DIR [--backend tensorrt|tensorrt-rtx]\n";
    return 2;
  }
  std::string backend = argc >= 5 && std::string(argv[3]) == "--backend" ? argv[4] : "tensorrt";
  try {
    mixbundle::Bundle bundle = mixbundle::load(argv[1]);
    mixbundle::Request req = mixbundle::load_request(bundle, argv[2]);
    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
    runtime->setEngineHostCodeAllowed(true);  // version-compatible engines embed their lean runtime
    std::map<std::string, Engine> engines;
    // every plan checked (path rule, sha256 in the manifest) before any is deserialized: plans are native code
    std::map<std::string, std::string> plans = mixbundle::verified_engines(bundle, backend);
    for (const auto& seg : bundle.segments) engines.emplace(seg.name, load_engine(*runtime, plans.at(seg.name)));
    cudaStream_t stream;
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    auto engine_type = [&](const Engine& e, const std::string& name) { return e.engine->getTensorDataType(name.c_str()); };
    std::map<std::string, DeviceTensor> uploaded, outs;
    std::map<std::string, const DeviceTensor*> feeds;
    if (const auto* full = bundle.find("full")) {
      Engine& e = engines.at(full->name);
      for (const auto& kv : req.user)
        uploaded.emplace(kv.first, upload(gather_rows(kv.second, req.user_index), engine_type(e, kv.first), kv.first));
      for (const auto& kv : req.item) uploaded.emplace(kv.first, upload(kv.second, engine_type(e, kv.first), kv.first));
      for (const auto& kv : uploaded) feeds[kv.first] = &kv.second;
      outs = run(e, feeds, stream);
    } else {
      const auto* user_seg = bundle.find("user");
      const auto* item_seg = bundle.find("item");
      Engine& ue = engines.at(user_seg->name);
      Engine& ie = engines.at(item_seg->name);
      for (const auto& kv : req.user)
        if (user_seg->has_input(kv.first)) uploaded.emplace(kv.first, upload(kv.second, engine_type(ue, kv.first), kv.first));
      for (const auto& kv : uploaded) feeds[kv.first] = &kv.second;
      std::map<std::string, DeviceTensor> state = run(ue, feeds, stream);  // once per user, stays on the GPU
      feeds.clear();
      std::map<std::string, DeviceTensor> item_up;
      for (const auto& kv : req.item) item_up.emplace(kv.first, upload(kv.second, engine_type(ie, kv.first), kv.first));
      if (item_seg->has_input("user_index"))
        item_up.emplace("user_index", upload(req.user_index, engine_type(ie, "user_index"), "user_index"));
      for (const auto& kv : state)
        if (item_seg->has_input(kv.first)) feeds[kv.first] = &kv.second;
      for (const auto& kv : item_up) feeds[kv.first] = &kv.second;
      outs = run(ie, feeds, stream);
    }
    for (const auto& spec : bundle.outputs) print_output(spec.name, outs.at(spec.name));
    cudaStreamDestroy(stream);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
