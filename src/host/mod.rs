//! Host set-up: secured-host state, CloudStack certificate layout, qemu.conf/libvirtd.conf and
//! firewall rules. (Stub: being written.)
