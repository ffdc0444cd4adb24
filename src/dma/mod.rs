//! Guest memory model, the pure conversion planner and the executors that apply its plans.
