//! impetus-sdk: the light client applications embed. Filled by the issue
//! "One peer, end to end" (the client) and later ones (the full API).
