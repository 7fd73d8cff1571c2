//! Kernel tests live in tests/.
