//! Benchmark harness: VM pairs, guest workloads, measurements, reports. (Stub: being written.)
