// Conventions for tessera's config structs.
//
// A config is a plain struct: every field has a default and a comment, and a
// validate() member that throws ConfigError naming the field and the accepted
// values. validate() runs before any collective, so a typo fails fast on every
// rank with the same message instead of hanging a group.
#pragma once

#include <string>

#include "tessera/core/error.h"

namespace tessera {

// A config field holds a bad value. field() is the dotted name ("mesh.tp").
class ConfigError : public InvalidArgument {
 public:
  ConfigError(std::string field, const std::string& problem)
      : InvalidArgument("config field '" + field + "': " + problem), field_(std::move(field)) {}
  const std::string& field() const { return field_; }

 private:
  std::string field_;
};

}  // namespace tessera

// TESSERA_CHECK_CONFIG(tp >= 1, "mesh.tp", "must be >= 1, got " << tp);
#define TESSERA_CHECK_CONFIG(cond, field, msg)           \
  do {                                                   \
    if (!(cond)) {                                       \
      std::ostringstream tessera_cfg_msg_;               \
      tessera_cfg_msg_ << msg;                           \
      throw ::tessera::ConfigError(field, tessera_cfg_msg_.str()); \
    }                                                    \
  } while (0)
