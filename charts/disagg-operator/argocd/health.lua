-- Argo CD health of a DisaggServing (disagg.io), from the status the operator writes.
-- Healthy: Ready. Progressing: not planned yet, status older than the spec, or rolling out.
-- Degraded: planning, rendering or applying failed (the last good plan keeps serving). Suspended: spec.paused.
local hs = {}
local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to plan"
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local conditions = {}
for _, c in ipairs(status.conditions or {}) do
  conditions[c.type] = c
end
local function said(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil then
    return c.reason
  end
  return fallback
end
local degraded = conditions["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = said(degraded, "Degraded")
  return hs
end
local planned = conditions["Planned"]
if planned ~= nil and planned.status == "False" then
  hs.status = "Degraded"
  hs.message = said(planned, "No plan")
  return hs
end
if (obj.spec ~= nil and obj.spec.paused == true) or status.phase == "Paused" then
  hs.status = "Suspended"
  hs.message = "Paused: the plan is reported in the status, nothing is applied"
  return hs
end
local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(planned, "Ready")
  return hs
end
hs.status = "Progressing"
hs.message = said(conditions["Progressing"], "Rolling out")
return hs
