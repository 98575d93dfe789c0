//! impetus-scaler: the leader's scaling policy, `decide(observation, policy) ->
//! actions` (pure), and the `Cloud` providers. Filled by a later issue.
