/* placeholder until the handshake binding lands */
#include "l_core.h"
void dx_open_handshake(lua_State *L) { (void)L; }
