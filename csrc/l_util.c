/* placeholder until the util binding lands */
#include "l_core.h"
void dx_open_util(lua_State *L) { (void)L; }
