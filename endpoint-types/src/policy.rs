//! The customer's approval policy, evaluated as a pure function of the policy and `now`.
//! (Being written: see the control-plane issue.)
