// Reading NumPy .npy files (format versions 1-3, little-endian, C order) without third-party code.
// Format: magic "\x93NUMPY", major, minor, header length (uint16 for v1, uint32 for v2/3), then a
// Python dict literal such as {'descr': '<f4', 'fortran_order': False, 'shape': (16, 5), }.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace mixnpy {

struct Array {
  std::string dtype;            // numpy name: float32, float16, float64, int64, int32, int8, uint8, bool
  std::vector<int64_t> shape;
  std::vector<char> data;       // numel * itemsize bytes, C order
  size_t itemsize = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

inline std::string dtype_name(const std::string& descr, size_t* itemsize) {
  if (descr.size() < 3) throw std::runtime_error("npy: bad descr '" + descr + "'");
  char order = descr[0];
  std::string code = descr.substr(1);
  *itemsize = static_cast<size_t>(std::stoul(code.substr(1)));
  if (order == '>' && *itemsize > 1) throw std::runtime_error("npy: big-endian arrays are not supported");
  if (code == "f4") return "float32";
  if (code == "f2") return "float16";
  if (code == "f8") return "float64";
  if (code == "i8") return "int64";
  if (code == "i4") return "int32";
  if (code == "i1") return "int8";
  if (code == "u1") return "uint8";
  if (code == "b1") return "bool";
  throw std::runtime_error("npy: unsupported dtype '" + descr + "'");
}

// The value text after 'key': in the header dict.
inline std::string header_field(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy: header has no '" + key + "'");
  at = header.find(':', at);
  if (at == std::string::npos) throw std::runtime_error("npy: malformed header");
  return header.substr(at + 1);
}

inline Array read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0)
    throw std::runtime_error(path + ": not a .npy file");
  int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw std::runtime_error(path + ": truncated header");
    for (int k = 3; k >= 0; --k) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + k]);
    offset = 12;
  } else {
    throw std::runtime_error(path + ": unsupported .npy version " + std::to_string(major));
  }
  if (offset + header_len > bytes.size()) throw std::runtime_error(path + ": truncated header");
  std::string header(bytes.data() + offset, header_len);

  Array a;
  std::string descr = header_field(header, "descr");
  size_t q1 = descr.find('\''), q2 = descr.find('\'', q1 + 1);
  if (q1 == std::string::npos || q2 == std::string::npos) throw std::runtime_error(path + ": bad descr");
  a.dtype = dtype_name(descr.substr(q1 + 1, q2 - q1 - 1), &a.itemsize);
  std::string fortran = header_field(header, "fortran_order");
  if (fortran.find("True") < fortran.find(',')) throw std::runtime_error(path + ": Fortran order is not supported");
  std::string shape = header_field(header, "shape");
  size_t open = shape.find('('), close = shape.find(')');
  if (open == std::string::npos || close == std::string::npos) throw std::runtime_error(path + ": bad shape");
  std::string dims = shape.substr(open + 1, close - open - 1);
  size_t pos = 0;
  while (pos < dims.size()) {
    size_t comma = dims.find(',', pos);
    std::string tok = dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (tok.find_first_not_of(" ") != std::string::npos) a.shape.push_back(std::stoll(tok));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  size_t need = static_cast<size_t>(a.numel()) * a.itemsize;
  size_t data_at = offset + header_len;
  if (bytes.size() - data_at < need) throw std::runtime_error(path + ": truncated data");
  a.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(data_at),
                bytes.begin() + static_cast<std::ptrdiff_t>(data_at + need));
  return a;
}

}  // namespace mixnpy
