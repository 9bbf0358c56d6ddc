/* placeholder until the loop binding lands */
#include "l_core.h"
void dx_open_loop(lua_State *L) { (void)L; }
