//! Rate limits per caller role: each configured role has a budget of calls
//! per second on this gateway replica. A caller whose roles all have a budget
//! and all are spent gets RESOURCE_EXHAUSTED; a role without a configured
//! budget is not limited. Placed after authentication, so it counts only
//! callers it can name.

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::Request;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use tonic::Status;
use tonic::body::Body;

use crate::guard::{Check, GuardLayer};
use crate::token::Caller;

/// The budgets, one limiter per limited role.
#[derive(Default)]
pub struct RateLimits {
    limiters: HashMap<String, DefaultDirectRateLimiter>,
}

impl RateLimits {
    /// `per_second` maps roles to calls per second; zero is not a budget.
    pub fn new(per_second: &BTreeMap<String, u32>) -> Self {
        let limiters = per_second
            .iter()
            .filter_map(|(role, rate)| {
                let rate = NonZeroU32::new(*rate)?;
                Some((role.clone(), RateLimiter::direct(Quota::per_second(rate))))
            })
            .collect();
        RateLimits { limiters }
    }

    /// Admits a call when any of the caller's roles is unlimited or has
    /// budget left.
    pub fn admit(&self, caller: &Caller) -> Result<(), Status> {
        let mut spent = Vec::new();
        for role in &caller.roles {
            match self.limiters.get(role) {
                None => return Ok(()),
                Some(limiter) if limiter.check().is_ok() => return Ok(()),
                Some(_) => spent.push(role.as_str()),
            }
        }
        if spent.is_empty() {
            return Ok(());
        }
        metrics::counter!("madtech_gateway_rate_limited_total").increment(1);
        Err(Status::resource_exhausted(format!(
            "rate limit of role(s) {spent:?} exceeded, retry shortly"
        )))
    }
}

/// The rate-limit layer.
pub fn layer(limits: Arc<RateLimits>) -> GuardLayer<Arc<RateLimits>> {
    GuardLayer::new(limits)
}

impl Check for Arc<RateLimits> {
    fn check(&self, request: &mut Request<Body>) -> Result<(), Status> {
        match request.extensions().get::<Caller>() {
            Some(caller) => self.admit(caller),
            // Authorization refuses callers without a name.
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(roles: &[&str]) -> Caller {
        Caller {
            subject: "t".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn a_spent_budget_refuses_and_unlimited_roles_pass() {
        let limits = RateLimits::new(&BTreeMap::from([
            ("marketer".to_string(), 2),
            ("ingest".to_string(), 1),
        ]));
        let marketer = caller(&["marketer"]);
        assert!(limits.admit(&marketer).is_ok());
        assert!(limits.admit(&marketer).is_ok());
        let refused = limits.admit(&marketer).expect_err("budget spent");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("marketer"));
        // Another limited role with budget left still admits the caller.
        assert!(limits.admit(&caller(&["marketer", "ingest"])).is_ok());
        // Roles without a budget are never limited.
        for _ in 0..100 {
            assert!(limits.admit(&caller(&["admin"])).is_ok());
        }
    }
}
