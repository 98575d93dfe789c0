//! impetus-queue
