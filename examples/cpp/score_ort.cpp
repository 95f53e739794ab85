// mixexport_score_ort: score requests on a mixexport ONNX bundle with the mixexport_ort library.
//
//   mixexport_score_ort BUNDLE REQUEST_DIR [--repeat N] [--threads T] [--requests R]
//                       [--cache-bytes B] [--manifest-sha256 HEX]
//
// REQUEST_DIR is one request (<input>.npy files, user_index.npy, optional user_ids.npy), or a
// directory of such request directories, scored in name order through one Scorer (so the per-user
// caches carry over: repeated users hit, grown histories append).
// stdout: for each request ("request NAME" first when there are several) every model output as
// "output NAME d0 d1 ..." and one line of values per row (9 significant digits: float32 round-trips).
// stderr: with --repeat N, each request scored N more times (p50 and mean), after untimed calls for
// at least 0.5 s (both sides of benchmarks/cpp_score.py time a warm scorer); with --requests R, a
// load run: R requests over T threads (default 1) sharing the Scorer, every answer compared with
// the first pass's (identical requests must get identical scores), p50/p99 latency.
// Exit codes (as the Python CLI): 0 ok, 1 an integrity check or the load run failed, 2 bad input or
// an unsupported bundle, 3 the ONNX Runtime library cannot run it. Errors are one "error: " line.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mixexport_ort.hpp"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
// --repeat times a warm scorer, as a server runs: untimed calls first, at least kWarmupCalls and for
// at least kWarmupSeconds. The first ~100 calls of a fresh process (~50 ms at 0.4 ms a call) run ~20%
// slower than the ones after (measured on rankmixer tiny 1x16: 0.42 ms vs 0.34 ms p50, no page faults
// after the first calls); a few calls alone would time that start-up, not the scorer.
constexpr int kWarmupCalls = 5;
constexpr double kWarmupSeconds = 0.5;

double value_at(const mixort::Tensor& t, int64_t i) {
  const char* p = t.data.data() + static_cast<size_t>(i) * t.itemsize;
  if (t.dtype == "float32") return *reinterpret_cast<const float*>(p);
  if (t.dtype == "float64") return *reinterpret_cast<const double*>(p);
  if (t.dtype == "int64") return static_cast<double>(*reinterpret_cast<const int64_t*>(p));
  if (t.dtype == "int32") return *reinterpret_cast<const int32_t*>(p);
  if (t.dtype == "bool" || t.dtype == "uint8") return *reinterpret_cast<const uint8_t*>(p);
  if (t.dtype == "int8") return *reinterpret_cast<const int8_t*>(p);
  throw mixort::Error("output of dtype " + t.dtype + " cannot be printed", 2);
}

void print_outputs(const mixort::Scorer& scorer, const mixort::Tensors& outs) {
  for (const auto& name : scorer.output_names()) {
    const mixort::Tensor& t = outs.at(name);
    int64_t rows = t.shape.empty() ? 1 : t.shape[0];
    int64_t cols = rows ? t.numel() / rows : 0;
    std::printf("output %s", name.c_str());
    for (int64_t d : t.shape) std::printf(" %lld", static_cast<long long>(d));
    std::printf("\n");
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) std::printf(c ? " %.9g" : "%.9g", value_at(t, r * cols + c));
      std::printf("\n");
    }
  }
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

// Largest relative difference between two score sets (0 when byte-identical).
double max_rel(const mixort::Tensors& a, const mixort::Tensors& b) {
  double worst = 0;
  for (const auto& kv : a) {
    const mixort::Tensor& other = b.at(kv.first);
    if (other.shape != kv.second.shape) return INFINITY;
    for (int64_t i = 0; i < kv.second.numel(); ++i) {
      double x = value_at(kv.second, i), y = value_at(other, i);
      worst = std::max(worst, std::fabs(x - y) / std::max(std::fabs(y), 1e-30));
    }
  }
  return worst;
}

long parse_count(const std::string& flag, const std::string& text, long lo) {
  char* end = nullptr;
  long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end || v < lo)
    throw mixort::Error(flag + " takes an integer >= " + std::to_string(lo) + ", found " + text, 2);
  return v;
}

struct Args {
  std::string bundle, requests;
  long repeat = 0, threads = 1, load = 0;
  mixort::Options options;
};

Args parse(int argc, char** argv) {
  if (argc < 3 || argv[1][0] == '-' || argv[2][0] == '-')
    throw mixort::Error("usage: mixexport_score_ort BUNDLE REQUEST_DIR [--repeat N] [--threads T] [--requests R] "
                        "[--cache-bytes B] [--manifest-sha256 HEX]", 2);
  Args a;
  a.bundle = argv[1];
  a.requests = argv[2];
  for (int k = 3; k < argc; k += 2) {
    std::string flag = argv[k];
    if (k + 1 >= argc) throw mixort::Error(flag + " needs a value", 2);
    std::string value = argv[k + 1];
    if (flag == "--repeat") a.repeat = parse_count(flag, value, 0);
    else if (flag == "--threads") a.threads = parse_count(flag, value, 1);
    else if (flag == "--requests") a.load = parse_count(flag, value, 1);
    else if (flag == "--cache-bytes") a.options.cache_bytes = static_cast<size_t>(parse_count(flag, value, 0));
    else if (flag == "--manifest-sha256") a.options.manifest_sha256 = value;
    else throw mixort::Error("unknown option " + flag + " (known: --repeat, --threads, --requests, --cache-bytes, "
                             "--manifest-sha256)", 2);
  }
  if (a.threads > 1 && !a.load) a.load = 1000;  // --threads alone: a load run of the default size
  return a;
}

// The request directories: REQUEST_DIR itself, or its subdirectories in name order.
std::vector<std::pair<std::string, std::string>> request_dirs(const std::string& dir) {
  if (!fs::is_directory(dir)) throw mixort::Error("request directory " + dir + " does not exist", 2);
  if (fs::exists(fs::path(dir) / "user_index.npy")) return {{"", dir}};
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_directory()) out.push_back({e.path().filename().string(), e.path().string()});
  std::sort(out.begin(), out.end());
  if (out.empty())
    throw mixort::Error("request directory " + dir + " holds neither user_index.npy nor request directories", 2);
  return out;
}

int run(const Args& a) {
  mixort::Scorer scorer(a.bundle, a.options);
  auto dirs = request_dirs(a.requests);
  std::vector<mixort::Request> reqs;
  for (const auto& d : dirs) reqs.push_back(mixort::read_request(scorer, d.second));
  std::vector<mixort::Tensors> first;
  // checked and scored in order (caches carry over), all before any output: nothing half-written
  for (const auto& r : reqs) first.push_back(scorer.score(r));
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (!dirs[i].first.empty()) std::printf("request %s\n", dirs[i].first.c_str());
    print_outputs(scorer, first[i]);
  }
  std::fflush(stdout);
  for (size_t i = 0; a.repeat > 0 && i < reqs.size(); ++i) {
    // ONNX Runtime plans its memory pattern and grows its arena on the first runs of a shape
    long warm = 0;
    for (auto w0 = Clock::now(); warm < kWarmupCalls || std::chrono::duration<double>(Clock::now() - w0).count() < kWarmupSeconds;
         ++warm)
      scorer.score(reqs[i]);
    std::vector<double> ms;
    for (long k = 0; k < a.repeat; ++k) {
      auto t0 = Clock::now();
      scorer.score(reqs[i]);
      ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
    double mean = 0;
    for (double v : ms) mean += v / static_cast<double>(ms.size());
    std::fprintf(stderr, "request %s: p50 %.4f ms, mean %.4f ms over %ld calls (%lld user(s) x %lld candidates), "
                 "after %ld untimed calls\n",
                 dirs[i].first.empty() ? "." : dirs[i].first.c_str(), percentile(ms, 0.5), mean, a.repeat,
                 static_cast<long long>(reqs[i].user.empty() ? 1 : reqs[i].user.begin()->second.shape[0]),
                 static_cast<long long>(reqs[i].user_index.numel()), warm);
  }
  int status = 0;
  if (a.load > 0) {
    std::atomic<long> next{0}, errors{0}, mismatches{0};
    std::vector<std::vector<double>> ms(static_cast<size_t>(a.threads));
    std::vector<double> worst(static_cast<size_t>(a.threads), 0);
    std::string first_error;
    std::mutex mu;
    auto t0 = Clock::now();
    std::vector<std::thread> pool;
    for (long t = 0; t < a.threads; ++t)
      pool.emplace_back([&, t] {
        for (long i; (i = next++) < a.load;) {
          size_t r = static_cast<size_t>(i) % reqs.size();
          auto s = Clock::now();
          try {
            mixort::Tensors out = scorer.score(reqs[r]);
            ms[static_cast<size_t>(t)].push_back(std::chrono::duration<double, std::milli>(Clock::now() - s).count());
            double rel = max_rel(out, first[r]);
            if (rel > 0) ++mismatches;
            worst[static_cast<size_t>(t)] = std::max(worst[static_cast<size_t>(t)], rel);
          } catch (const std::exception& e) {
            ++errors;
            std::lock_guard<std::mutex> lock(mu);
            if (first_error.empty()) first_error = e.what();
          }
        }
      });
    for (auto& th : pool) th.join();
    double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    std::vector<double> all;
    for (const auto& v : ms) all.insert(all.end(), v.begin(), v.end());
    std::fprintf(stderr, "load: %ld requests on %ld threads: %ld errors, %ld mismatches (max rel diff %.3g), "
                 "p50 %.4f ms, p99 %.4f ms, %.1f requests/s\n", a.load, a.threads, errors.load(), mismatches.load(),
                 *std::max_element(worst.begin(), worst.end()), percentile(all, 0.5), percentile(all, 0.99),
                 static_cast<double>(a.load) / seconds);
    if (errors) {
      std::fprintf(stderr, "error: %ld of %ld load requests failed, the first with: %s\n", errors.load(), a.load,
                   first_error.c_str());
      status = 1;
    }
  }
  auto u = scorer.user_cache_stats();
  auto kv = scorer.kv_stats();
  std::fprintf(stderr, "cache: user state %lld hits, %lld misses, %lld evictions, %lld entries, %lld bytes; kv %lld hits, "
               "%lld appends, %lld misses\n", static_cast<long long>(u.hits), static_cast<long long>(u.misses),
               static_cast<long long>(u.evictions), static_cast<long long>(u.entries), static_cast<long long>(u.bytes),
               static_cast<long long>(kv.hits),
               static_cast<long long>(kv.appends), static_cast<long long>(kv.misses));
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const mixort::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", e.what());
    return e.code;
  } catch (const std::exception& e) {  // a bug or an exhausted resource: still one line
    std::fprintf(stderr, "error: %s\n", e.what());
    return 4;
  }
}
