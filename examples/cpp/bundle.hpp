// The parts of a mixexport bundle a C++ server needs, read from manifest.json (the bundle's single
// source of truth), and a request read from a directory of .npy files. Shared by the AOTI scorer
// and the TensorRT loader; no torch or TensorRT types here.
//
// A bundle is a trust boundary, and the manifest is untrusted input: it is parsed with nlohmann/json
// (duplicate keys refused, so it means one thing to every reader), every path it names must be
// relative, without "..", and resolve (links followed) inside the bundle directory, and every
// package or plan is checked against its sha256 in the manifest before it is loaded
// (verified_engines). These are the same rules, with the same messages, as mixexport's Python
// runtime (mixexport/trust.py).
//
// Request directory: one <input name>.npy per model input (user-side inputs — roles user and
// sequence — with U rows, item inputs with N rows) plus user_index.npy (int64 [N]: the user row
// each candidate belongs to). `python examples/cpp/make_request.py BUNDLE DIR` writes one from the
// bundle's inputs/sample.npz.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ids.hpp"
#include "npy.hpp"
#include "sha256.hpp"

namespace mixbundle {

namespace fs = std::filesystem;
using json = nlohmann::json;

inline const char* kPathRule = "relative, no '..', resolving inside the bundle";

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

// A path as Python's repr() shows it ('...' with escapes), so both runtimes print the same line.
inline std::string shown(const std::string& s) {
  std::string out = "'";
  for (unsigned char ch : s) {
    if (ch == '\\' || ch == '\'') {
      out += '\\';
      out += static_cast<char>(ch);
    } else if (ch < 0x20 || ch == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out + "'";
}

// The one name rule for segment and tensor names (mixexport/names.py): they become file names
// (<input>.npy in a request directory) and model names, so they are checked when the manifest is read.
inline const char* kNameRule = "1 to 128 characters from A-Z a-z 0-9 _ . -, not starting with '.' or '-'";

// Why `name` breaks the name rule, or "" (the same words as Python's name_problem).
inline std::string manifest_name_problem(const std::string& name) {
  if (name.empty()) return "it is empty";
  if (name.size() > 128) return "it has " + std::to_string(name.size()) + " characters, more than 128";
  for (unsigned char ch : name) {
    if (!(std::isalnum(ch) && ch < 0x80) && ch != '_' && ch != '.' && ch != '-')
      return "it holds " + shown(std::string(1, static_cast<char>(ch)));
  }
  if (name[0] == '.' || name[0] == '-') return "it starts with " + shown(name.substr(0, 1));
  return "";
}

// Throws unless `name` (the entry `where` of the manifest file `manifest`, e.g. "segments[0].name")
// obeys the name rule; the message is the Python reader's (a long name shortened the same way).
inline void check_manifest_name(const std::string& name, const std::string& where,
                                const std::string& manifest = "manifest") {
  std::string problem = manifest_name_problem(name);
  if (problem.empty()) return;
  std::string text = shown(name);
  if (text.size() > 80) text = text.substr(0, 72) + "\u2026" + text.substr(text.size() - 6);
  throw std::runtime_error(manifest + ": " + where + " is " + text + ", which breaks the name rule (" + kNameRule +
                           "): " + problem);
}

// Why `rel` breaks the path rule on its own (without the file system), or "".
inline std::string path_problem(const std::string& rel) {
  if (rel.empty()) return "it is empty";
  if (rel.size() > 1024) return "it is longer than 1024 characters";
  for (unsigned char ch : rel)
    if (ch < 0x20 || ch == 0x7f) return "it holds control or unprintable characters";
  if (rel.find('\\') != std::string::npos) return "it uses '\\' (bundle paths are '/'-separated)";
  if (rel[0] == '/' || (rel.size() > 1 && rel[1] == ':')) return "it is absolute";
  std::stringstream parts(rel);
  std::string part;
  while (std::getline(parts, part, '/'))
    if (part == "..") return "it climbs out with '..'";
  return "";
}

inline bool inside(const fs::path& base, const fs::path& p) {
  auto b = base.begin(), q = p.begin();
  for (; b != base.end(); ++b, ++q)
    if (q == p.end() || *b != *q) return false;
  return true;
}

// root/rel after checking the path rule; throws naming the manifest entry (`where`), the path and the rule.
inline std::string resolve_inside(const std::string& root, const std::string& rel, const std::string& where) {
  std::string reason = path_problem(rel);
  if (reason.empty()) {
    fs::path base = fs::weakly_canonical(fs::path(root));
    fs::path real = fs::weakly_canonical(fs::path(root) / rel);
    if (real == base) {
      reason = "it names the bundle directory itself";
    } else if (!inside(base, real)) {
      bool link = false;
      fs::path walk = root;
      for (const auto& part : fs::path(rel)) link = link || fs::is_symlink(walk /= part);
      reason = "it resolves to " + real.string() + ", outside the bundle" + (link ? " (through a symbolic link)" : "");
    } else if (rel.back() == '/' || fs::is_directory(real)) {
      reason = "it names a directory, not a file";
    }
  }
  if (!reason.empty())
    throw std::runtime_error(where + " " + shown(rel) + " breaks the bundle path rule (" + kPathRule + "): " + reason);
  return root + "/" + rel;
}

struct Bundle {
  std::string root, target, precision;
  std::vector<Spec> inputs, outputs;  // the model's interface
  std::vector<Segment> segments;
  std::map<std::string, std::string> files;  // bundle-relative path -> sha256
  json data;  // the whole manifest, for readers of entries not modelled here (session options, caches)

  const Segment* find(const std::string& role) const {
    for (const auto& s : segments)
      if (s.role == role) return &s;
    return nullptr;
  }
  // The path of `rel` inside the bundle, refused unless it obeys the path rule.
  std::string file(const std::string& rel) const { return resolve_inside(root, rel, "bundle path"); }

  // file(rel), refused unless it is listed in the manifest's files with its sha256 and matches it.
  std::string verified_file(const std::string& rel) const {
    std::string path = file(rel);
    auto it = files.find(rel);
    if (it == files.end())
      throw std::runtime_error(rel + " has no sha256 in the manifest's files; refusing to load an unverified file");
    if (!fs::is_regular_file(path))
      throw std::runtime_error(rel + " is missing from the bundle (or is not a regular file); refusing to load it");
    if (mixsha::file_hex(path) != it->second)
      throw std::runtime_error(rel + " does not match its sha256 in the manifest (changed after the build); "
                               "refusing to load it");
    return path;
  }
};

// segment name -> path of its engine for `backend` ("aoti", "tensorrt"), every one checked (path
// rule, sha256) before the caller loads any: native code is loaded only once all of it is verified.
inline std::map<std::string, std::string> verified_engines(const Bundle& b, const std::string& backend) {
  std::map<std::string, std::string> out;
  for (const auto& seg : b.segments) {
    auto it = seg.engines.find(backend);
    if (it == seg.engines.end())
      throw std::runtime_error("segment " + seg.name + " has no " + backend + " engine: build with the matching --target");
    out[seg.name] = b.verified_file(it->second);
  }
  return out;
}

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Typed access with messages naming the entry (nlohmann's own say only "type must be string").
inline const json& at(const json& obj, const std::string& key, const std::string& where) {
  if (!obj.is_object()) throw std::runtime_error("manifest: " + where + " must be an object");
  auto it = obj.find(key);
  if (it == obj.end()) throw std::runtime_error("manifest: " + where + " is missing '" + key + "'");
  return *it;
}
inline std::string str(const json& v, const std::string& where) {
  if (!v.is_string()) throw std::runtime_error("manifest: " + where + " must be a string");
  return v.get<std::string>();
}
inline const json& array(const json& v, const std::string& where) {
  if (!v.is_array()) throw std::runtime_error("manifest: " + where + " must be a list");
  return v;
}

inline std::vector<Spec> specs(const json& list, const std::string& where, const std::string& manifest = "manifest") {
  std::vector<Spec> out;
  size_t k = 0;
  for (const auto& v : array(list, where)) {
    std::string w = where + "[" + std::to_string(k++) + "]";
    Spec s{str(at(v, "name", w), w + ".name"), str(at(v, "dtype", w), w + ".dtype"), str(at(v, "role", w), w + ".role"), {}};
    check_manifest_name(s.name, w + ".name", manifest);
    for (const auto& d : array(at(v, "shape", w), w + ".shape")) {
      if (d.is_string()) s.shape.push_back(d.get<std::string>());
      else if (d.is_number_unsigned()) s.shape.push_back(std::to_string(d.get<uint64_t>()));
      else throw std::runtime_error("manifest: " + w + ".shape holds a dim that is neither a name nor a size");
    }
    out.push_back(s);
  }
  return out;
}

// Parse refusing duplicate keys: Python's json and nlohmann would each pick one of the two values.
inline json parse_manifest(const std::string& text) {
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    // copying or walking a json value recurses: a manifest nested past any real one is refused
    // here, as Python's reader refuses it (RecursionError), before it can exhaust the stack
    if (depth > 256) throw std::runtime_error("manifest.json is nested too deeply to be a manifest");
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    else if (event == json::parse_event_t::object_end) keys.pop_back();
    else if (event == json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second && duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  json m;
  try {
    m = json::parse(text, cb);
  } catch (const json::exception& e) {
    throw std::runtime_error(std::string("manifest.json is not valid JSON (") + e.what() + ")");
  }
  if (!duplicate.empty()) throw std::runtime_error("manifest.json is not valid JSON (duplicate key " + shown(duplicate) + ")");
  return m;
}

// `pinned`: the manifest's own sha256 as published with the bundle ("" = not pinned); a manifest
// whose bytes differ is refused before it is parsed.
inline Bundle load(const std::string& root, const std::string& pinned = "") {
  std::string text = read_text(root + "/manifest.json");
  if (!pinned.empty()) {
    mixsha::Sha256 h;
    h.update(reinterpret_cast<const unsigned char*>(text.data()), text.size());
    std::string digest = h.hex(), want = pinned;
    for (char& ch : want) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (digest != want)
      throw std::runtime_error(root + "/manifest.json has sha256 " + digest + ", not the pinned " + pinned.substr(0, 64));
  }
  json m = parse_manifest(text);
  const json& version = at(m, "schema_version", "manifest");
  if (!version.is_number_integer() || version.get<int64_t>() != 1)
    throw std::runtime_error("manifest: unsupported bundle schema version " + version.dump());
  Bundle b;
  b.root = root;
  b.data = m;
  b.target = str(at(m, "target", "manifest"), "target");
  b.precision = m.contains("precision") && m["precision"].is_string() ? m["precision"].get<std::string>() : "fp32";
  const json& model = at(m, "model", "manifest");
  std::string manifest = root + "/manifest.json";
  b.inputs = specs(at(model, "inputs", "model"), "model.inputs", manifest);
  b.outputs = specs(at(model, "outputs", "model"), "model.outputs", manifest);
  const json& files = at(m, "files", "manifest");
  if (!files.is_object()) throw std::runtime_error("manifest: files must be an object");
  for (const auto& kv : files.items()) {
    resolve_inside(root, kv.key(), "files key");
    b.files[kv.key()] = str(kv.value(), "files[" + shown(kv.key()) + "]");
  }
  size_t i = 0;
  std::set<std::string> names;
  for (const auto& v : array(at(m, "segments", "manifest"), "segments")) {
    std::string w = "segments[" + std::to_string(i++) + "]";
    Segment s{str(at(v, "name", w), w + ".name"), str(at(v, "role", w), w + ".role"),
              specs(at(v, "inputs", w), w + ".inputs", manifest), specs(at(v, "outputs", w), w + ".outputs", manifest),
              {}};
    check_manifest_name(s.name, w + ".name", manifest);
    if (!names.insert(s.name).second) throw std::runtime_error("manifest: segments name segment " + shown(s.name) + " twice");
    resolve_inside(root, str(at(v, "file", w), w + ".file"), w + ".file");
    if (v.contains("data_files") && !v["data_files"].is_null()) {
      size_t k = 0;
      for (const auto& d : array(v["data_files"], w + ".data_files")) {
        std::string wd = w + ".data_files[" + std::to_string(k++) + "]";
        resolve_inside(root, str(d, wd), wd);
      }
    }
    if (v.contains("engines") && !v["engines"].is_null()) {
      if (!v["engines"].is_object()) throw std::runtime_error("manifest: " + w + ".engines must be an object");
      for (const auto& kv : v["engines"].items()) {
        std::string we = w + ".engines[" + shown(kv.key()) + "]";
        s.engines[kv.key()] = str(kv.value(), we);
        resolve_inside(root, s.engines[kv.key()], we);
      }
    }
    b.segments.push_back(s);
  }
  // the runtime's layouts (mixexport/manifest_check.py LAYOUTS); a scorer refuses those it does not run
  std::multiset<std::string> roles;
  for (const auto& s : b.segments) roles.insert(s.role);
  const std::vector<std::multiset<std::string>> layouts = {{"full"}, {"user", "item"}, {"cache", "item"}, {"cache", "user", "item"}};
  if (std::find(layouts.begin(), layouts.end(), roles) == layouts.end())
    throw std::runtime_error("unsupported segment layout: expected one full segment, or user/cache segments and an item segment");
  return b;
}

struct Request {
  std::map<std::string, mixnpy::Array> user, item;  // by input name
  mixnpy::Array user_index;                          // int64 [N]
  int64_t users = 0, candidates = 0;
};

// Element i (C order) of an integer array as int64 (0 for other dtypes: they carry no ids).
inline int64_t int_at(const mixnpy::Array& a, int64_t i) {
  const char* p = a.data.data() + static_cast<size_t>(i) * a.itemsize;
  if (a.dtype == "int64") return *reinterpret_cast<const int64_t*>(p);
  if (a.dtype == "int32") return *reinterpret_cast<const int32_t*>(p);
  if (a.dtype == "int8") return *reinterpret_cast<const int8_t*>(p);
  if (a.dtype == "uint8") return *reinterpret_cast<const uint8_t*>(p);
  return 0;
}

// Reads and checks a request against the model's input specs (dtype, rank, static dims, row counts,
// user_index range): a server must reject bad input before it reaches a kernel.
inline Request load_request(const Bundle& b, const std::string& dir) {
  Request r;
  r.user_index = mixnpy::read(dir + "/user_index.npy");
  if (r.user_index.dtype != "int64" || r.user_index.shape.size() != 1)
    throw std::runtime_error("user_index.npy must be an int64 vector [N]");
  r.candidates = r.user_index.shape[0];
  r.users = -1;
  size_t position = 0;
  for (const auto& spec : b.inputs) {
    mixnpy::Array a = mixnpy::read(dir + "/" + spec.name + ".npy");
    const json& entry = b.data.at("model").at("inputs").at(position++);
    if (a.dtype != spec.dtype)
      throw std::runtime_error("input " + spec.name + ": expected " + spec.dtype + ", found " + a.dtype);
    if (a.shape.size() != spec.shape.size())
      throw std::runtime_error("input " + spec.name + ": expected rank " + std::to_string(spec.shape.size()));
    for (size_t k = 1; k < spec.shape.size(); ++k)
      if (std::isdigit(static_cast<unsigned char>(spec.shape[k][0])) && std::stoll(spec.shape[k]) != a.shape[k])
        throw std::runtime_error("input " + spec.name + ": axis " + std::to_string(k) + " must be " + spec.shape[k]);
    // ids outside their ranges are refused before anything runs (mixexport.specs.check_feeds's message)
    mixids::check((spec.user_side() ? "user input '" : "item input '") + spec.name + "'", a.shape, a.numel(),
                  mixids::read(entry, "model.inputs[" + std::to_string(position - 1) + "]"),
                  [&](int64_t i) { return int_at(a, i); });
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
