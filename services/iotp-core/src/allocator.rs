//! The services' allocator: mimalloc, and how soon it gives freed memory back. The one module
//! of the workspace allowed `unsafe`: its FFI calls set and read one mimalloc option.
#![allow(unsafe_code)]

use std::os::raw::{c_int, c_long};

/// mimalloc for every service: glibc's malloc and free were about a sixth of the parser's and
/// the bridge's CPU in `perf` profiles under load (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (`mimalloc.h`, v2 and v3 alike; the
/// crate does not export it "for stability reasons", so [`tests`] pins it by its default).
const PURGE_DELAY: c_int = 15;

/// How long freed pages stay before they go back to the OS, milliseconds.
const PURGE_AFTER_MS: c_long = 100;

extern "C" {
    #[cfg(test)]
    fn mi_option_get(option: c_int) -> c_long;
    fn mi_option_set(option: c_int, value: c_long);
}

/// Give freed pages back to the OS after 100 ms instead of mimalloc 3's 1 s, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise. A stage's batch (up to a second of records in the
/// aggregator) reuses its pages within that second, so with 1 s the resident set stayed at the
/// peak of the last batch: the aggregator at 69 MiB steady in the unthrottled standard run,
/// 63 with 100 ms. Immediate purging (0) gave the same memory but cost the enricher about 1.5
/// µs per message at 5,000 msgs/s, where its 20 ms batches free and refault pages; 100 ms did
/// not (docs/performance.md, session 18).
pub(crate) fn purge_freed_pages_sooner() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options (an atomic store); valid at any time.
        unsafe { mi_option_set(PURGE_DELAY, PURGE_AFTER_MS) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purge_delay_ms() -> c_long {
        // SAFETY: reads one of mimalloc's options.
        unsafe { mi_option_get(PURGE_DELAY) }
    }

    /// Nothing else in this test binary sets the option, so it holds mimalloc 3's default
    /// (1,000 ms) until the services' setting replaces it: a mimalloc whose options moved would
    /// fail here instead of the services setting some other option to 100.
    #[test]
    fn the_option_set_is_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        assert_eq!(
            purge_delay_ms(),
            1000,
            "option {PURGE_DELAY} is not the purge delay"
        );
        purge_freed_pages_sooner();
        assert_eq!(purge_delay_ms(), 100);
    }
}
