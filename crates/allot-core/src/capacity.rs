//! The capacity rule of invariant I1, in one place.
//!
//! Every store applies [`check_claim`] inside its write transaction, to the claims it has
//! just read for the resource; nothing else decides whether capacity is free. Times are
//! seconds since the Unix epoch; intervals are half-open `[start, end)`.

/// The longest span one claim may block (buffers included). Stores rely on it to bound the
/// index range they scan for overlapping claims; `inventory::price_item` refuses longer ones.
pub const CLAIM_SECONDS_MAX: i64 = 400 * 86_400;

/// A half-open interval of seconds since the epoch; `start < end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    pub start: i64,
    pub end: i64,
}

impl Span {
    pub fn new(start: i64, end: i64) -> Self {
        assert!(start < end, "span must not be empty: {start}..{end}");
        Self { start, end }
    }
    pub fn overlaps(&self, other: &Span) -> bool {
        self.start < other.end && other.start < self.end
    }
    pub fn contains(&self, t: i64) -> bool {
        self.start <= t && t < self.end
    }
}

/// Units of a resource taken over a span (buffers already included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub span: Span,
    pub quantity: u32,
}

/// A capacity that replaces the base capacity during a span (closures, extra rooms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverrideSpan {
    pub span: Span,
    pub capacity: u32,
}

/// What the rule needs to know about a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityRules {
    pub capacity: u32,
    pub overbooking_percent: u32,
    /// Later entries win where overrides overlap.
    pub overrides: Vec<OverrideSpan>,
}

/// The requested quantity does not fit: the first instant where it fails and what was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    pub at: i64,
    pub remaining: u32,
}

impl CapacityRules {
    pub fn simple(capacity: u32) -> Self {
        Self { capacity, overbooking_percent: 0, overrides: Vec::new() }
    }

    /// Effective capacity at instant `t`: override or base, times `1 + overbooking%`, floored.
    pub fn effective_at(&self, t: i64) -> u32 {
        let base = self.overrides.iter().rev().find(|o| o.span.contains(t)).map_or(self.capacity, |o| o.capacity);
        let scaled = u64::from(base) * (100 + u64::from(self.overbooking_percent)) / 100;
        u32::try_from(scaled).unwrap_or(u32::MAX)
    }
}

/// The least capacity left anywhere in `span`, given `existing` claims.
pub fn remaining(rules: &CapacityRules, existing: &[Claim], span: Span) -> u32 {
    let mut least = u32::MAX;
    for_each_segment(rules, existing, span, |_, used, cap| {
        least = least.min(cap.saturating_sub(used));
    });
    least
}

/// Decides I1 for one new claim: `Ok` iff at every instant of `new.span` the quantity already
/// claimed plus `new.quantity` stays within the effective capacity at that instant.
pub fn check_claim(rules: &CapacityRules, existing: &[Claim], new: Claim) -> Result<(), Shortfall> {
    assert!(new.quantity > 0, "a claim takes at least one unit");
    let mut shortfall = None;
    for_each_segment(rules, existing, new.span, |at, used, cap| {
        if shortfall.is_none() && u64::from(used) + u64::from(new.quantity) > u64::from(cap) {
            shortfall = Some(Shortfall { at, remaining: cap.saturating_sub(used) });
        }
    });
    shortfall.map_or(Ok(()), Err)
}

/// Splits `span` at every point where usage or capacity may change and calls
/// `f(segment_start, used, effective_capacity)` for each piece, in time order.
pub fn for_each_segment(rules: &CapacityRules, existing: &[Claim], span: Span, mut f: impl FnMut(i64, u32, u32)) {
    // Usage changes only at claim edges; capacity only at override edges.
    let mut deltas: Vec<(i64, i64)> = Vec::with_capacity(existing.len() * 2);
    let mut used_at_start: i64 = 0;
    for c in existing.iter().filter(|c| c.span.overlaps(&span)) {
        if c.span.start <= span.start {
            used_at_start += i64::from(c.quantity);
        } else {
            deltas.push((c.span.start, i64::from(c.quantity)));
        }
        if c.span.end < span.end {
            deltas.push((c.span.end, -i64::from(c.quantity)));
        }
    }
    for o in rules.overrides.iter().filter(|o| o.span.overlaps(&span)) {
        for edge in [o.span.start, o.span.end] {
            if span.start < edge && edge < span.end {
                deltas.push((edge, 0));
            }
        }
    }
    deltas.sort_unstable();
    let mut used = used_at_start;
    let mut at = span.start;
    let mut i = 0;
    loop {
        while i < deltas.len() && deltas[i].0 == at {
            used += deltas[i].1;
            i += 1;
        }
        debug_assert!(used >= 0, "usage cannot be negative");
        f(at, u32::try_from(used).unwrap_or(u32::MAX), rules.effective_at(at));
        match deltas.get(i) {
            Some(&(next, _)) => at = next,
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(start: i64, end: i64, quantity: u32) -> Claim {
        Claim { span: Span::new(start, end), quantity }
    }

    #[test]
    fn half_open_intervals_touching_do_not_conflict() {
        let rules = CapacityRules::simple(1);
        assert!(check_claim(&rules, &[claim(0, 10, 1)], claim(10, 20, 1)).is_ok());
        assert!(check_claim(&rules, &[claim(0, 10, 1)], claim(9, 20, 1)).is_err());
    }

    #[test]
    fn overbooking_rounds_down() {
        let rules = CapacityRules { capacity: 5, overbooking_percent: 20, overrides: vec![] };
        assert_eq!(rules.effective_at(0), 6);
        let rules = CapacityRules { capacity: 20, overbooking_percent: 5, overrides: vec![] };
        assert_eq!(rules.effective_at(0), 21);
        let rules = CapacityRules { capacity: 10, overbooking_percent: 5, overrides: vec![] };
        assert_eq!(rules.effective_at(0), 10);
    }

    #[test]
    fn override_closes_part_of_a_claim() {
        let rules = CapacityRules {
            capacity: 3,
            overbooking_percent: 0,
            overrides: vec![OverrideSpan { span: Span::new(50, 60), capacity: 0 }],
        };
        let err = check_claim(&rules, &[], claim(0, 100, 1)).expect_err("closed at 50");
        assert_eq!(err, Shortfall { at: 50, remaining: 0 });
        assert!(check_claim(&rules, &[], claim(60, 100, 3)).is_ok());
        assert_eq!(remaining(&rules, &[claim(0, 10, 2)], Span::new(0, 40)), 1);
    }

    #[test]
    fn staggered_claims_peak_is_what_counts() {
        let rules = CapacityRules::simple(2);
        let existing = [claim(0, 10, 1), claim(5, 15, 1)];
        assert!(check_claim(&rules, &existing, claim(10, 20, 1)).is_ok());
        assert_eq!(check_claim(&rules, &existing, claim(7, 8, 1)), Err(Shortfall { at: 7, remaining: 0 }));
        assert_eq!(check_claim(&rules, &existing, claim(0, 6, 1)), Err(Shortfall { at: 5, remaining: 0 }));
    }
}
