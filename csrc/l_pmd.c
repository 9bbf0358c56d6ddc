/* placeholder until the pmd binding lands */
#include "l_core.h"
void dx_open_pmd(lua_State *L) { (void)L; }
