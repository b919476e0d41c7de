//! Node configuration: what the operator renders into each node's ConfigMap
//! and what each node parses at start-up. One definition, one validation.

pub mod connector;
pub mod kms;
pub mod relay;
