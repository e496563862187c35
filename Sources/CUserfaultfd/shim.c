// The shim is header-only (static inline wrappers); this file gives SwiftPM a translation unit to build, and
// compiles the header's _Static_asserts that check our kernel ABI declarations against the kernel's numbers.
#include "CUserfaultfd.h"
