//! The host counter: `mach_absolute_time` and its timebase.
//!
//! On Apple silicon `mach_absolute_time` reads the 24 MHz system counter
//! that the guest's CNTVCT_EL0 derives from (`CNTVCT = host − offset`,
//! hvf-semantics.md §6.1), and `mach_timebase_info` converts it to
//! nanoseconds with 125/3. The double keeps both: a monotonic 24 MHz count
//! from the process's first use of the clock.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Counter frequency of the machines reported (hvf-semantics.md §6.1).
pub const HZ: u64 = 24_000_000;
/// `mach_timebase_info` on Apple silicon: ticks × 125 / 3 = nanoseconds.
pub const TIMEBASE_NUMER: u32 = 125;
pub const TIMEBASE_DENOM: u32 = 3;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The host count now.
pub fn now() -> u64 {
    let nanos = origin().elapsed().as_nanos();
    u64::try_from(nanos * u128::from(TIMEBASE_DENOM) / u128::from(TIMEBASE_NUMER))
        .unwrap_or(u64::MAX)
}

/// The host instant at which the count reaches `ticks` (`None` if that
/// is beyond what `Instant` can hold).
pub fn instant_of(ticks: u64) -> Option<Instant> {
    let nanos = u128::from(ticks) * u128::from(TIMEBASE_NUMER) / u128::from(TIMEBASE_DENOM);
    let nanos = u64::try_from(nanos).ok()?;
    origin().checked_add(Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_monotonic_and_maps_back_to_instants() {
        let a = now();
        let b = now();
        assert!(b >= a);
        let at = instant_of(a).unwrap();
        // `a` ticks after the origin can never lie in the future of now.
        assert!(at <= Instant::now());
        assert!(instant_of(u64::MAX).is_none() || instant_of(u64::MAX).unwrap() > at);
    }

    #[test]
    fn one_second_is_24_million_ticks() {
        let nanos = u128::from(HZ) * u128::from(TIMEBASE_NUMER) / u128::from(TIMEBASE_DENOM);
        assert_eq!(nanos, 1_000_000_000);
    }
}
