// Placeholder: being written.
#include "tessera/optim/diloco.h"
