// The parts of a mixexport bundle a C++ server needs, read from manifest.json (the bundle's single
// source of truth), and a request read from a directory of .npy files. Shared by the AOTI scorer
// and the TensorRT loader; no torch or TensorRT types here.
//
// Request directory: one <input name>.npy per model input (user-side inputs — roles user and
// sequence — with U rows, item inputs with N rows) plus user_index.npy (int64 [N]: the user row
// each candidate belongs to). `python examples/cpp/make_request.py BUNDLE DIR` writes one from the
// bundle's inputs/sample.npz.
#pragma once

#include <cctype>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.hpp"
#include "npy.hpp"

namespace mixbundle {

struct Spec {
  std::string name, dtype, role;
  std::vector<std::string> shape;  // "16" for a static dim, the axis name for a symbolic one
  bool user_side() const { return role == "user" || role == "sequence"; }
};

struct Segment {
  std::string name, role;  // role: full | user | item
  std::vector<Spec> inputs, outputs;
  std::map<std::string, std::string> engines;  // backend -> path relative to the bundle
  bool has_input(const std::string& n) const {
    for (const auto& s : inputs)
      if (s.name == n) return true;
    return false;
  }
};

struct Bundle {
  std::string root, target, precision;
  std::vector<Spec> inputs, outputs;  // the model's interface
  std::vector<Segment> segments;

  const Segment* find(const std::string& role) const {
    for (const auto& s : segments)
      if (s.role == role) return &s;
    return nullptr;
  }
  std::string file(const std::string& rel) const { return root + "/" + rel; }
};

inline std::string read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline std::vector<Spec> specs(const mixjson::Value& list) {
  std::vector<Spec> out;
  for (const auto& v : list.items()) {
    Spec s{v["name"].str(), v["dtype"].str(), v["role"].str(), {}};
    for (const auto& d : v["shape"].items())
      s.shape.push_back(d.is_string() ? d.str() : std::to_string(d.integer()));
    out.push_back(s);
  }
  return out;
}

inline Bundle load(const std::string& root) {
  mixjson::Value m = mixjson::parse(read_text(root + "/manifest.json"));
  if (m["schema_version"].integer() != 1)
    throw std::runtime_error("unsupported bundle schema version " + std::to_string(m["schema_version"].integer()));
  Bundle b;
  b.root = root;
  b.target = m["target"].str();
  b.precision = m.has("precision") && m["precision"].is_string() ? m["precision"].str() : "fp32";
  b.inputs = specs(m["model"]["inputs"]);
  b.outputs = specs(m["model"]["outputs"]);
  for (const auto& v : m["segments"].items()) {
    Segment s{v["name"].str(), v["role"].str(), specs(v["inputs"]), specs(v["outputs"]), {}};
    if (v.has("engines") && v["engines"].is_object())
      for (const auto& kv : v["engines"].object) s.engines[kv.first] = kv.second.str();
    b.segments.push_back(s);
  }
  bool full = b.segments.size() == 1 && b.segments[0].role == "full";
  bool split = b.segments.size() == 2 && b.find("user") && b.find("item");
  if (!full && !split) throw std::runtime_error("unsupported segment layout: expected one full segment, or user + item");
  return b;
}

struct Request {
  std::map<std::string, mixnpy::Array> user, item;  // by input name
  mixnpy::Array user_index;                          // int64 [N]
  int64_t users = 0, candidates = 0;
};

// Reads and checks a request against the model's input specs (dtype, rank, static dims, row counts,
// user_index range): a server must reject bad input before it reaches a kernel.
inline Request load_request(const Bundle& b, const std::string& dir) {
  Request r;
  r.user_index = mixnpy::read(dir + "/user_index.npy");
  if (r.user_index.dtype != "int64" || r.user_index.shape.size() != 1)
    throw std::runtime_error("user_index.npy must be an int64 vector [N]");
  r.candidates = r.user_index.shape[0];
  r.users = -1;
  for (const auto& spec : b.inputs) {
    mixnpy::Array a = mixnpy::read(dir + "/" + spec.name + ".npy");
    if (a.dtype != spec.dtype)
      throw std::runtime_error("input " + spec.name + ": expected " + spec.dtype + ", found " + a.dtype);
    if (a.shape.size() != spec.shape.size())
      throw std::runtime_error("input " + spec.name + ": expected rank " + std::to_string(spec.shape.size()));
    for (size_t k = 1; k < spec.shape.size(); ++k)
      if (std::isdigit(static_cast<unsigned char>(spec.shape[k][0])) && std::stoll(spec.shape[k]) != a.shape[k])
        throw std::runtime_error("input " + spec.name + ": axis " + std::to_string(k) + " must be " + spec.shape[k]);
    if (spec.user_side()) {
      if (r.users >= 0 && r.users != a.shape[0]) throw std::runtime_error("user inputs disagree on the number of users");
      r.users = a.shape[0];
      r.user[spec.name] = std::move(a);
    } else {
      if (a.shape[0] != r.candidates)
        throw std::runtime_error("item input " + spec.name + " has " + std::to_string(a.shape[0]) +
                                 " rows, user_index has " + std::to_string(r.candidates));
      r.item[spec.name] = std::move(a);
    }
  }
  if (r.users < 0) r.users = 1;  // a model without user-side inputs: every candidate is user 0
  const auto* idx = reinterpret_cast<const int64_t*>(r.user_index.data.data());
  for (int64_t i = 0; i < r.candidates; ++i)
    if (idx[i] < 0 || idx[i] >= r.users)
      throw std::runtime_error("user_index[" + std::to_string(i) + "] = " + std::to_string(idx[i]) +
                               " is outside [0, " + std::to_string(r.users) + ")");
  return r;
}

}  // namespace mixbundle
