//! Block-layer commands: NBD server and exports, block nodes, mirror jobs. (Filled in with
//! block migration.)
