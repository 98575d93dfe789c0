//! impetus-tests: end-to-end tests that start real `impetus` processes on
//! loopback. Helpers live here; the tests in `tests/`.
