//! PKI directories in QEMU's layout: load, validate, decide whether a side is secured, and make
//! lab PKIs. (Stub: being written.)
