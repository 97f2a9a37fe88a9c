# Live recovery over loopback: round trips, aliasing, refused and garbage
# connections, forged streams, timeouts, a training run moved into a fresh
# one (a few seconds).
tessera_add_test(test_live_recovery ${CMAKE_CURRENT_SOURCE_DIR}/live_recovery_test.cc)
