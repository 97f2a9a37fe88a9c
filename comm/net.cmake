# comm/net: sockets with deadlines, frames and the join handshake, and
# tessera's own TCP store built on them (the elastic jobs' rendezvous).
target_sources(tessera PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/net/socket.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/net/auth.cc)
# The handshake's HMAC-SHA256 and nonces: OpenSSL, or errors naming TESSERA_WITH_OPENSSL.
if(TESSERA_HAVE_OPENSSL)
  target_sources(tessera PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/net/crypto.cc)
else()
  target_sources(tessera PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/net/crypto_unavailable.cc)
endif()
target_sources(tessera PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/store/store_protocol.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/store/store_server.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/store/store_client.cc)
