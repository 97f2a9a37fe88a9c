// Placeholder: being written.
#include "tessera/optim/demo.h"
