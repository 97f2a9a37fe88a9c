// Placeholder: being written.
#include "tessera/optim/mt_dao.h"
