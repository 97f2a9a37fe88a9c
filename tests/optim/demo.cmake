tessera_add_test(test_demo demo_test.cc)
