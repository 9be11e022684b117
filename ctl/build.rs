// The same git revision logic as the agent's (see agent/build.rs).
include!("../agent/build.rs");
