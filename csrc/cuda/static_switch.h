// Turning runtime flags into compile-time constants:
//   BOOL_SWITCH(params.is_causal, kIsCausal, [&] { launch<kIsCausal>(params, stream); });
// The lambda body sees `kIsCausal` as a `static constexpr bool`. Both branches are instantiated.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      static constexpr bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      static constexpr bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
