# In-process fault injection (comm/fault.h).
tessera_add_test(test_fault fault_test.cc)

# scripts/netns-cluster.sh, end to end (skipped unless root).
add_test(NAME netns_cluster
         COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/netns_cluster_test.sh ${PROJECT_SOURCE_DIR}/scripts/netns-cluster.sh)
set_tests_properties(netns_cluster PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 60)
