/* placeholder until the socket binding lands */
#include "l_core.h"
void dx_open_socket(lua_State *L) { (void)L; }
