tessera_add_test(test_mt_dao mt_dao_test.cc)
