//! Moving a VM's addresses to the active site: BGP speaker, DNS dynamic
//! update (RFC 2136 + TSIG) and operator hooks. Knows nothing about VMs.
