//! Grant and op state transitions as pure functions taking `now`.
//! (Being written: see the control-plane issue.)
