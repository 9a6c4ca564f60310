//! Site PKI (certificate authority and site certificates for mutual TLS).
