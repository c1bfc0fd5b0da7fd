//! The in-memory router runs the whole conformance suite: one test per scenario.

use agentcomm_testkit::memory::MemoryBackend;

agentcomm_testkit::conformance_tests!(MemoryBackend::new());
