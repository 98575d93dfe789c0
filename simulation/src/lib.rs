//! impetus-simulation: the seeded whole-cluster simulator. Filled by the issue
//! "Deterministic simulation".
