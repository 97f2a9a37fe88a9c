tessera_add_test(test_diloco diloco_test.cc)
