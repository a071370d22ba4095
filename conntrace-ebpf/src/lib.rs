#![no_std]
// This file exists so that `conntrace` can name this crate as a build-dependency (cargo then
// rebuilds the eBPF object when this crate or `conntrace-common` changes).
